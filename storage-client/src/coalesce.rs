//! Coalescing of concurrent writes into few requests. Every room of a chat
//! server appends one batch at a time and every DM is its own call; without
//! this, a busy server sends one small HTTP request per room batch and per
//! DM, and the dbproxy spends more on HTTP than on storing. Here, calls wait
//! on one bounded queue; one task per kind of call sends what is waiting as
//! one request (items in arrival order), with at most [`REQUESTS_IN_FLIGHT`]
//! requests outstanding, and hands each caller its own slice of the answer.
//! While the requests are out, new calls gather into the next one: the
//! busier the server, the bigger each request.
//!
//! Calls whose items all carry a client id may be resent to another dbproxy
//! after any failure, others only when the request never left
//! ([`Retry`](super::client)); requests mix only calls of one class.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use chat_storage_api::{ApiError, ErrorKind};

/// Requests of one kind outstanding at once. Two keep a dbproxy busy (one
/// request committing while the next is on its way) and let the MySQL
/// backend's two append writers work side by side; more make each request
/// smaller and commits more frequent. Measured with `chat bench --scenario
/// durable` (200 rooms): at 5k msgs/s on SQLite, ack p99 38–46 ms with 1 or
/// 2 and 143 ms with 4; unpaced on MariaDB, 21k acked/s with 1 and 29k with 2.
const REQUESTS_IN_FLIGHT: usize = 2;
/// Items per request: the dbproxy's group commit takes up to
/// `batch_max_items` (512 by default) per transaction, so bigger requests
/// gain nothing.
const MAX_ITEMS: usize = 1024;
/// Estimated body size per request, well under dbproxy's `max_body_bytes`
/// (4 MiB by default). A single call above it still goes, alone.
const MAX_BYTES: usize = 1 << 20;
/// Calls waiting for a request; callers wait (backpressure) when it is full.
const QUEUE: usize = 8192;

/// Answer to a call: a result per item, in order, and the storage position.
pub(crate) type Outcome<O> = Result<(Vec<O>, Option<String>), ApiError>;
type BoxFut<O> = Pin<Box<dyn Future<Output = Outcome<O>> + Send>>;
/// Sends one request with these items; `true` if it may be resent elsewhere.
pub(crate) type SendFn<I, O> = Arc<dyn Fn(Vec<I>, bool) -> BoxFut<O> + Send + Sync>;

/// What the coalescer needs to know about an item.
pub(crate) trait Item: Send + 'static {
    /// Whether storage deduplicates it (it carries a client id).
    fn idempotent(&self) -> bool;
    /// Rough size once encoded, in bytes.
    fn weight(&self) -> usize;
}

struct Call<I, O> {
    items: Vec<I>,
    safe: bool,
    reply: oneshot::Sender<Outcome<O>>,
}

/// Gathers calls of one kind; its task starts with the first call and ends
/// when the coalescer is dropped and what it holds is answered.
pub(crate) struct Coalescer<I, O> {
    send: SendFn<I, O>,
    tx: OnceLock<mpsc::Sender<Call<I, O>>>,
}

impl<I: Item, O: Send + 'static> Coalescer<I, O> {
    pub(crate) fn new(send: SendFn<I, O>) -> Self {
        Coalescer {
            send,
            tx: OnceLock::new(),
        }
    }

    /// Stores `items` together with whatever other calls are waiting.
    pub(crate) async fn call(&self, items: Vec<I>) -> Outcome<O> {
        if items.is_empty() {
            return Ok((Vec::new(), None));
        }
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            // Owned by its channel rather than a tracker: it answers every
            // queued call and ends once this coalescer (and so its client)
            // is dropped, which is what the client's owner waits for.
            tokio::spawn(run(rx, self.send.clone()));
            tx
        });
        let safe = items.iter().all(Item::idempotent);
        let (reply, answer) = oneshot::channel();
        let call = Call { items, safe, reply };
        if tx.send(call).await.is_err() {
            return Err(unavailable("storage client stopped"));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(unavailable("storage client stopped")))
    }
}

fn unavailable(message: &str) -> ApiError {
    ApiError::new(ErrorKind::Unavailable, message)
}

async fn run<I: Item, O: Send + 'static>(mut rx: mpsc::Receiver<Call<I, O>>, send: SendFn<I, O>) {
    let mut pending: VecDeque<Call<I, O>> = VecDeque::new();
    let mut in_flight = JoinSet::new();
    let mut open = true;
    loop {
        // Take what is waiting, but hold at most what the open slots can
        // send: the rest stays in the bounded channel, and callers wait.
        let room = (REQUESTS_IN_FLIGHT - in_flight.len() + 1) * MAX_ITEMS;
        while open && pending_items(&pending) < room {
            match rx.try_recv() {
                Ok(call) => pending.push_back(call),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        while in_flight.len() < REQUESTS_IN_FLIGHT && !pending.is_empty() {
            let group = take_group(&mut pending);
            in_flight.spawn(answer(group, send.clone()));
        }
        if !open && pending.is_empty() && in_flight.is_empty() {
            return;
        }
        tokio::select! {
            call = rx.recv(), if open && pending.is_empty() => match call {
                Some(call) => pending.push_back(call),
                None => open = false,
            },
            _ = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
}

fn pending_items<I, O>(pending: &VecDeque<Call<I, O>>) -> usize {
    pending.iter().map(|c| c.items.len()).sum()
}

/// The first waiting call and, in order, the later ones of its class that
/// fit into the same request.
fn take_group<I: Item, O>(pending: &mut VecDeque<Call<I, O>>) -> Vec<Call<I, O>> {
    let first = pending.pop_front().expect("a pending call");
    let safe = first.safe;
    let mut items = first.items.len();
    let mut bytes: usize = first.items.iter().map(Item::weight).sum();
    let mut group = vec![first];
    let mut rest = VecDeque::with_capacity(pending.len());
    while let Some(call) = pending.pop_front() {
        let w: usize = call.items.iter().map(Item::weight).sum();
        if call.safe == safe && items + call.items.len() <= MAX_ITEMS && bytes + w <= MAX_BYTES {
            items += call.items.len();
            bytes += w;
            group.push(call);
        } else {
            rest.push_back(call);
        }
    }
    *pending = rest;
    group
}

/// Sends one request for the group and answers each call with its part.
async fn answer<I: Item, O: Send + 'static>(group: Vec<Call<I, O>>, send: SendFn<I, O>) {
    let safe = group[0].safe;
    let mut counts = Vec::with_capacity(group.len());
    let mut replies = Vec::with_capacity(group.len());
    let mut items = Vec::new();
    for call in group {
        counts.push(call.items.len());
        items.extend(call.items);
        replies.push(call.reply);
    }
    let total = items.len();
    match send(items, safe).await {
        Ok((results, pos)) if results.len() == total => {
            let mut results = results.into_iter();
            for (reply, n) in replies.into_iter().zip(counts) {
                let mine: Vec<O> = results.by_ref().take(n).collect();
                let _ = reply.send(Ok((mine, pos.clone())));
            }
        }
        other => {
            let e = match other {
                Err(e) => e,
                Ok(_) => ApiError::new(
                    ErrorKind::Internal,
                    "storage answered a different number of results",
                ),
            };
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    #[derive(Debug)]
    struct N(u32, bool);

    impl Item for N {
        fn idempotent(&self) -> bool {
            self.1
        }
        fn weight(&self) -> usize {
            8
        }
    }

    /// Each request's item numbers and whether it was sent as resendable.
    type Log = Arc<Mutex<Vec<(Vec<u32>, bool)>>>;

    /// A sender that records each request's items and answers each item
    /// with its number times ten, after a short delay.
    fn recorder() -> (SendFn<N, u32>, Log) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let send: SendFn<N, u32> = Arc::new(move |items: Vec<N>, safe| {
            let l = l.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let ids: Vec<u32> = items.iter().map(|n| n.0).collect();
                l.lock().unwrap().push((ids.clone(), safe));
                Ok((ids.iter().map(|i| i * 10).collect(), Some("p".into())))
            })
        });
        (send, log)
    }

    #[tokio::test]
    async fn concurrent_calls_share_requests_and_get_their_own_answers() {
        let (send, log) = recorder();
        let c = Arc::new(Coalescer::new(send));
        let mut tasks = Vec::new();
        for i in 0..100u32 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.call(vec![N(2 * i, true), N(2 * i + 1, true)]).await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let (res, pos) = t.await.unwrap().unwrap();
            let i = i as u32;
            assert_eq!(res, vec![20 * i, 20 * i + 10]);
            assert_eq!(pos.as_deref(), Some("p"));
        }
        let log = log.lock().unwrap();
        let all: usize = log.iter().map(|(ids, _)| ids.len()).sum();
        assert_eq!(all, 200);
        assert!(log.len() < 100, "{} requests for 100 calls", log.len());
        // A call's items stay together and in order.
        for (ids, _) in log.iter() {
            for pair in ids.chunks(2) {
                assert_eq!(pair[0] + 1, pair[1]);
            }
        }
    }

    #[tokio::test]
    async fn classes_do_not_mix() {
        let (send, log) = recorder();
        let c = Arc::new(Coalescer::new(send));
        let mut tasks = Vec::new();
        for i in 0..40u32 {
            let c = c.clone();
            tasks.push(tokio::spawn(
                async move { c.call(vec![N(i, i % 2 == 0)]).await },
            ));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        for (ids, safe) in log.lock().unwrap().iter() {
            assert!(ids.iter().all(|i| (i % 2 == 0) == *safe), "{ids:?} {safe}");
        }
    }

    #[tokio::test]
    async fn a_failed_request_fails_each_of_its_calls_and_nothing_else() {
        let calls = Arc::new(AtomicUsize::new(0));
        let k = calls.clone();
        let send: SendFn<N, u32> = Arc::new(move |items: Vec<N>, _| {
            let k = k.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if k == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Err(unavailable("down"))
                } else {
                    Ok((items.iter().map(|n| n.0).collect(), None))
                }
            })
        });
        let c = Coalescer::new(send);
        assert!(c.call(vec![N(1, true)]).await.is_err());
        assert_eq!(c.call(vec![N(2, true)]).await.unwrap().0, vec![2]);
        assert_eq!(c.call(vec![]).await.unwrap().0, Vec::<u32>::new());
    }

    #[tokio::test]
    async fn a_short_answer_is_an_error_not_a_misattribution() {
        let send: SendFn<N, u32> =
            Arc::new(|_items: Vec<N>, _| Box::pin(async { Ok((vec![1], None)) }));
        let c = Coalescer::new(send);
        let e = c.call(vec![N(1, true), N(2, true)]).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Internal);
    }
}
