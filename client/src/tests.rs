//! The rules the bench's checked workload relies on beyond `chat client`'s:
//! tracked sends, events, read-your-writes probes, catch-up with a page size.

use std::time::{Duration, Instant};

use chat_protocol::ServerLine;

use crate::{ClientState, Event, Options, Stored, Via};

fn line(s: &str) -> ServerLine {
    s.parse().unwrap_or_else(|e| panic!("{e}"))
}

fn checked() -> ClientState {
    let mut s = ClientState::with_options(Options {
        history_limit: Some(1000),
        read_your_writes_every: Some(5),
        events: true,
        ..Options::default()
    });
    s.on_line(&line(
        "OK LOGIN alice alice.0123456789abcdef0123456789abcdef",
    ));
    s
}

#[test]
fn tracked_sends_are_acked_once_and_resent_until_then() {
    let mut s = checked();
    s.unacked()
        .insert("a.1".into(), "MSG id=a.1 lobby hi".into());
    s.unacked().insert("a.2".into(), "DM id=a.2 bob hey".into());
    assert_eq!(
        s.unacked().resend_all(),
        ["MSG id=a.1 lobby hi", "DM id=a.2 bob hey"]
    );
    s.on_line(&line("OK JOIN lobby 0"));
    s.take_events();
    s.on_line(&line("OK MSG lobby 1 100 id=a.1"));
    s.on_line(&line("OK MSG lobby 1 100 id=a.1"));
    s.on_line(&line("OK DM bob 7 100 id=a.2"));
    assert_eq!(
        s.take_events(),
        [
            Event::Acked {
                cid: "a.1".into(),
                stored: Stored::Room {
                    room: "lobby".into(),
                    seq: 1
                }
            },
            Event::Acked {
                cid: "a.2".into(),
                stored: Stored::Dm {
                    to: "bob".into(),
                    id: 7
                }
            },
        ],
        "a second answer for the same id is not a second ack"
    );
    assert!(s.unacked().is_empty());
}

#[test]
fn retryable_refusal_waits_then_resends_and_others_give_up() {
    let mut s = checked();
    s.unacked()
        .insert("a.1".into(), "MSG id=a.1 lobby hi".into());
    s.unacked()
        .insert("a.2".into(), "MSG id=a.2 gone hi".into());
    let now = Instant::now();
    s.on_line_at(&line("ERR UNAVAILABLE id=a.1 storage down"), now);
    s.on_line_at(&line("ERR NOT_MEMBER id=a.2 gone"), now);
    assert_eq!(s.unacked().len(), 1, "a refusal that cannot pass gives up");
    assert!(s.unacked().due(now).is_empty(), "not before the pause");
    let later = now + Duration::from_millis(250);
    assert_eq!(s.unacked().due(later), ["MSG id=a.1 lobby hi"]);
    assert!(s.unacked().due(later).is_empty(), "once per refusal");
}

#[test]
fn first_receipts_are_events_duplicates_are_not() {
    let mut s = checked();
    s.on_line(&line("OK JOIN lobby 2"));
    s.on_line(&line("MSG lobby 3 1 bob live"));
    s.on_line(&line("MSG lobby 3 1 bob live"));
    let r = s.on_line(&line("MSG lobby 5 1 bob jump"));
    assert_eq!(r.send, ["HISTORY lobby 3 1000"], "the page size asked for");
    s.on_line(&line("HIST lobby 4 1 bob old"));
    s.on_line(&line("HIST lobby 5 1 bob jump"));
    s.on_line(&line("DM 9 1 bob psst"));
    s.on_line(&line("DM 9 1 bob psst"));
    let msg = |seq, text: &str, via| Event::Message {
        room: "lobby".into(),
        seq,
        from: "bob".into(),
        text: text.into(),
        via,
    };
    assert_eq!(
        s.take_events(),
        [
            Event::Joined {
                room: "lobby".into(),
                seq: 2
            },
            msg(3, "live", Via::Live),
            msg(5, "jump", Via::Live),
            msg(4, "old", Via::History),
            Event::Dm {
                id: 9,
                from: "bob".into(),
                text: "psst".into()
            },
        ]
    );
    assert!(!s.caught_up(), "the HISTORY is still in flight");
    s.on_line(&line("OK HISTORY lobby 2"));
    assert!(s.caught_up());
}

#[test]
fn read_your_writes_probe_reports_what_it_read() {
    let mut s = checked();
    s.on_line(&line("OK JOIN lobby 4"));
    let r = s.on_line(&line("OK MSG lobby 5 1 id=x"));
    assert_eq!(r.send, ["HISTORY lobby 4 1"]);
    s.on_line(&line("HIST lobby 5 1 alice mine"));
    s.on_line(&line("OK HISTORY lobby 1"));
    let r = s.on_line(&line("OK MSG lobby 10 1 id=y"));
    assert_eq!(r.send, ["HISTORY lobby 5 1000"], "a gap first, no probe");
    s.on_line(&line("OK HISTORY lobby 0"));
    let events: Vec<Event> = s
        .take_events()
        .into_iter()
        .filter(|e| matches!(e, Event::ReadYourWrites { .. }))
        .collect();
    assert_eq!(
        events,
        [Event::ReadYourWrites {
            room: "lobby".into(),
            seq: 5,
            ok: true
        }]
    );
}

#[test]
fn periodic_check_asks_again_after_a_failed_history() {
    let mut s = checked();
    s.on_line(&line("OK JOIN lobby 0"));
    assert_eq!(
        s.on_line(&line("MSG lobby 3 1 bob x")).send,
        ["HISTORY lobby 0 1000"]
    );
    assert!(s.history_requests().is_empty(), "one request at a time");
    s.on_line(&line("ERR UNAVAILABLE storage"));
    assert_eq!(s.history_requests(), ["HISTORY lobby 0 1000"]);
    assert_eq!(s.contiguous().get("lobby"), Some(&0));
    assert!(s.joined("lobby") && !s.joined("other"));
}

#[test]
fn without_events_nothing_is_collected() {
    let mut s = ClientState::new();
    s.on_line(&line("OK JOIN lobby 0"));
    s.on_line(&line("MSG lobby 1 1 bob x"));
    assert!(s.take_events().is_empty());
}
