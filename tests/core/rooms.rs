//! Rooms and presence: JOIN, PART, QUIT, disconnects, ROOMS, WHO, restored rooms.

use chat_protocol::ServerLine;

use crate::common::{Client, ErrorCode, PartReason, Stack};

fn joined(room: &str, user: &str) -> ServerLine {
    ServerLine::Joined {
        room: room.into(),
        user: user.into(),
    }
}

/// Waits for the next PART event about `user` in `room` and returns its reason.
async fn next_part_of(c: &mut Client, room: &str, user: &str) -> PartReason {
    match c
        .expect(
            &format!("PART {room} {user} <reason>"),
            |l| matches!(l, ServerLine::Parted { room: r, user: u, .. } if r == room && u == user),
        )
        .await
    {
        ServerLine::Parted { reason, .. } => reason,
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_creates_room_and_announces() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    let (mut bob, _) = stack.login("bob", "pw").await;

    alice.send("JOIN #general").await;
    let mut seen = Vec::new();
    while !seen.iter().any(|l| matches!(l, ServerLine::OkJoin { .. })) {
        seen.push(alice.recv().await);
    }
    seen.append(&mut alice.sync().await);
    assert!(
        seen.contains(&ServerLine::OkJoin {
            room: "#general".into(),
            last_seq: 0
        }),
        "JOIN of a new room answers OK JOIN #general 0, got {seen:?}"
    );
    assert!(
        seen.contains(&joined("#general", "alice")),
        "the joiner gets `JOIN #general alice`, got {seen:?}"
    );

    // Keywords are case-insensitive.
    bob.send("join #general").await;
    bob.expect("OK JOIN #general 0", |l| {
        *l == ServerLine::OkJoin {
            room: "#general".into(),
            last_seq: 0,
        }
    })
    .await;
    alice
        .expect("JOIN #general bob", |l| *l == joined("#general", "bob"))
        .await;

    // Joining again is harmless and answers the same.
    let (seq, _) = alice.msg("#general", "a1", "hello").await;
    assert_eq!(seq, 1);
    assert_eq!(
        alice.join("#general").await,
        1,
        "re-JOIN answers OK JOIN with the last seq"
    );
    let (seq, _) = alice.msg("#general", "a2", "hello again").await;
    assert_eq!(seq, 2, "re-JOIN must not disturb the room");

    // Room names are case-sensitive: `#General` is a different, new room.
    assert_eq!(alice.join("#General").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part_announces_left_and_ends_membership() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    alice.join("r").await;
    bob.join("r").await;
    alice
        .expect("JOIN r bob", |l| *l == joined("r", "bob"))
        .await;

    bob.send("PART r").await;
    bob.expect("OK PART r", |l| {
        *l == ServerLine::OkPart { room: "r".into() }
    })
    .await;
    assert_eq!(next_part_of(&mut alice, "r", "bob").await, PartReason::Left);

    // No longer a member: cannot post, not listed, not restored on login.
    bob.send("MSG r still here?").await;
    bob.expect_err(ErrorCode::NotMember).await;
    alice.send("WHO r").await;
    let mut members = Vec::new();
    loop {
        match alice.recv().await {
            ServerLine::Member { user, .. } => members.push(user),
            ServerLine::OkWho { count, .. } => {
                assert_eq!(count as usize, members.len());
                break;
            }
            _ => {}
        }
    }
    assert_eq!(members, vec!["alice".to_string()], "WHO after bob's PART");
    let (mut bob2, _) = stack.login("bob", "pw").await;
    let lines = bob2.sync().await;
    assert!(
        !lines.iter().any(|l| matches!(l, ServerLine::OkJoin { .. })),
        "a login after PART must not restore the room, got {lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_disconnect_announces_disconnected() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    alice.join("r").await;
    bob.join("r").await;
    alice
        .expect("JOIN r bob", |l| *l == joined("r", "bob"))
        .await;

    drop(bob); // no QUIT: the socket just goes away
    assert_eq!(
        next_part_of(&mut alice, "r", "bob").await,
        PartReason::Disconnected
    );

    // Still a member: the next login restores the room and others see the JOIN.
    let (mut bob, _) = stack.login("bob", "pw").await;
    bob.expect("OK JOIN r 0 (restored)", |l| {
        *l == ServerLine::OkJoin {
            room: "r".into(),
            last_seq: 0,
        }
    })
    .await;
    alice
        .expect("JOIN r bob (bob is back)", |l| *l == joined("r", "bob"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_says_bye_and_announces_quit() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    let (mut carol, _) = stack.login("carol", "pw").await;
    for c in [&mut alice, &mut bob, &mut carol] {
        c.join("r").await;
    }
    alice
        .expect("JOIN r carol", |l| *l == joined("r", "carol"))
        .await;

    bob.send("QUIT").await;
    let lines = bob.expect_closed().await;
    assert_eq!(
        lines.last(),
        Some(&ServerLine::Bye {
            reason: "quit".into()
        }),
        "QUIT answers `BYE quit` as the last line before the close"
    );
    assert_eq!(next_part_of(&mut alice, "r", "bob").await, PartReason::Quit);

    // DISCONNECT is the same as QUIT.
    carol.send("DISCONNECT").await;
    let lines = carol.expect_closed().await;
    assert_eq!(
        lines.last(),
        Some(&ServerLine::Bye {
            reason: "quit".into()
        })
    );
    assert_eq!(
        next_part_of(&mut alice, "r", "carol").await,
        PartReason::Quit
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part_reason_comes_from_the_last_session() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.join("r").await;
    let (bob1, _) = stack.login("bob", "pw").await;
    let (mut bob2, _) = stack.login("bob", "pw").await;
    bob2.join("r").await;
    alice
        .expect("JOIN r bob", |l| *l == joined("r", "bob"))
        .await;

    // bob stays online through bob2 when bob1 drops, so the first PART alice
    // sees must be the one for bob2's QUIT.
    drop(bob1);
    // Nothing observable says the server has seen bob1's EOF (bob is still
    // online), so give it a moment before bob2 quits.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    bob2.sync().await;
    bob2.send("QUIT").await;
    bob2.expect_closed().await;
    assert_eq!(
        next_part_of(&mut alice, "r", "bob").await,
        PartReason::Quit,
        "bob went offline when his last session sent QUIT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_lists_rooms_by_name() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    for room in ["beta", "alpha", "gamma"] {
        alice.join(room).await;
    }
    bob.join("beta").await;
    alice.msg("beta", "b1", "one").await;
    alice.msg("beta", "b2", "two").await;
    alice.msg("gamma", "g1", "one").await;

    // Asked by alice, whose message was the last write: her reads see it even
    // when a replica serves them (another session's reads may lag a little).
    alice.send("ROOMS").await;
    let mut rooms = Vec::new();
    loop {
        match alice.recv().await {
            ServerLine::Room {
                room,
                last_seq,
                members,
            } => rooms.push((room, last_seq, members)),
            ServerLine::OkRooms { count } => {
                assert_eq!(count as usize, rooms.len(), "OK ROOMS count = ROOM lines");
                break;
            }
            ServerLine::Err { code, detail } => panic!("ROOMS answered ERR {code} {detail}"),
            _ => {}
        }
    }
    assert_eq!(
        rooms,
        vec![
            ("alpha".to_string(), 0, 1),
            ("beta".to_string(), 2, 2),
            ("gamma".to_string(), 1, 1)
        ],
        "ROOMS: every room, by name, with its last seq and members"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_lists_online_members() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    let (mut carol, _) = stack.login("carol", "pw").await;
    for c in [&mut alice, &mut bob, &mut carol] {
        c.join("r").await;
    }
    alice
        .expect("JOIN r carol", |l| *l == joined("r", "carol"))
        .await;
    carol.send("QUIT").await;
    carol.expect_closed().await;
    next_part_of(&mut alice, "r", "carol").await;

    alice.send("WHO r").await;
    let mut members = Vec::new();
    loop {
        match alice.recv().await {
            ServerLine::Member { room, user } => {
                assert_eq!(room, "r");
                members.push(user);
            }
            ServerLine::OkWho { room, count } => {
                assert_eq!(room, "r");
                assert_eq!(count as usize, members.len(), "OK WHO count = MEMBER lines");
                break;
            }
            ServerLine::Err { code, detail } => panic!("WHO answered ERR {code} {detail}"),
            _ => {}
        }
    }
    members.sort();
    assert_eq!(
        members,
        vec!["alice".to_string(), "bob".to_string()],
        "WHO lists the members online now (carol quit)"
    );

    alice.send("WHO nowhere").await;
    alice.expect_err(ErrorCode::NoSuchRoom).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_restores_rooms() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.join("r1").await;
    alice.join("r2").await;
    alice.msg("r1", "m1", "first").await;

    // A second session (the first still online) gets every room.
    let (mut second, _) = stack.login("alice", "pw").await;
    let mut lines = second.sync().await;
    lines.retain(|l| matches!(l, ServerLine::OkJoin { .. }));
    lines.sort_by_key(|l| l.to_string());
    assert_eq!(
        lines,
        vec![
            ServerLine::OkJoin {
                room: "r1".into(),
                last_seq: 1
            },
            ServerLine::OkJoin {
                room: "r2".into(),
                last_seq: 0
            },
        ],
        "login sends OK JOIN <room> <last-seq> for every room of the user"
    );

    // And after going offline entirely.
    alice.send("QUIT").await;
    alice.expect_closed().await;
    second.send("QUIT").await;
    second.expect_closed().await;
    let (mut third, _) = stack.login("alice", "pw").await;
    let mut lines = third.sync().await;
    lines.retain(|l| matches!(l, ServerLine::OkJoin { .. }));
    assert_eq!(
        lines.len(),
        2,
        "both rooms restored after a full logout, got {lines:?}"
    );
    // The restored membership is real: the session can post.
    let (seq, _) = third.msg("r1", "m2", "second").await;
    assert_eq!(seq, 2);
}

/// A room nobody is present in is dropped from the server's memory; it comes
/// back on the next JOIN with its seq continuing from storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_left_empty_continues_its_seq() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.join("quiet").await;
    let (first, _) = alice.msg("quiet", "a1", "one").await;
    alice.send("PART quiet").await;
    alice
        .expect(
            "OK PART quiet",
            |l| matches!(l, ServerLine::OkPart { room } if room == "quiet"),
        )
        .await;

    let (mut bob, _) = stack.login("bob", "pw").await;
    assert_eq!(
        bob.join("quiet").await,
        first,
        "JOIN reports the stored last seq"
    );
    let (second, _) = bob.msg("quiet", "b1", "two").await;
    assert_eq!(
        second,
        first + 1,
        "seq continues densely after the room was idle"
    );
    let hist = bob.history("quiet", 0, None).await;
    assert_eq!(hist.len(), 2, "both messages are stored: {hist:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_per_user_are_bounded() {
    let stack = Stack::start_with(|c| c.max_rooms_per_user = 2).await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.join("a").await;
    alice.join("b").await;
    alice.send("JOIN c").await;
    alice.expect_err(ErrorCode::TooManyRooms).await;
    // A room she is in still answers; after a PART there is room for another.
    assert_eq!(alice.join("a").await, 0);
    alice.send("PART a").await;
    alice
        .expect(
            "OK PART a",
            |l| matches!(l, ServerLine::OkPart { room } if room == "a"),
        )
        .await;
    alice.join("c").await;
}

/// The dbproxy holds the limit whatever the server's own setting: a server
/// allowing 1000 rooms still gets `ERR TOO_MANY_ROOMS` from a dbproxy that
/// allows 2 (and the memberships stay at 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_holds_the_rooms_per_user_limit() {
    let stack = Stack::start_configured(|db| db.max_rooms_per_user = 2, |_| {}).await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.join("a").await;
    alice.join("b").await;
    alice.send("JOIN c").await;
    let detail = alice.expect_err(ErrorCode::TooManyRooms).await;
    assert!(detail.contains("at most 2 rooms"), "{detail:?}");
    alice.send("QUIT").await;
    alice.expect_closed().await;
    // The next login restores exactly the two rooms.
    let (mut again, _) = stack.login("alice", "pw").await;
    let joins: Vec<String> = again
        .sync()
        .await
        .into_iter()
        .filter_map(|l| match l {
            ServerLine::OkJoin { room, .. } => Some(room),
            _ => None,
        })
        .collect();
    assert_eq!(joins, ["a", "b"]);
}
