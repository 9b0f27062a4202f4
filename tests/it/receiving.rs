//! Tasks waiting on a session (in `recv`, `delivered`, a call) hear of its end, share what
//! arrives, and work from any thread: what a change to who reads a connection's frames must
//! keep.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use crate::common::*;
use futures_util::FutureExt;
use quicseal::{ApplicationError, Call, Error, Limits, NodeConfig, Router};

const LONG: Duration = Duration::from_secs(10);

/// Runs `future` to completion on this thread, outside any tokio runtime.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut Context::from_waker(&waker)) {
            return v;
        }
        std::thread::park();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_receipt_ends_when_the_peer_closes() {
    let pki = Pki::new("ca");
    let (_a, _b, ab, ba) = session_pair(&pki, Limits::default(), Limits::default()).await;
    ab.send_bytes(1, &b"never read"[..]).await.unwrap();
    let waiting = ab.delivered(1);
    tokio::pin!(waiting);
    // Polled once: it waits before the peer goes.
    assert!((&mut waiting).now_or_never().is_none(), "nobody read the message");
    drop(ba);
    let e = tokio::time::timeout(LONG, waiting).await.expect("the waiter hears of the end");
    assert!(e.is_err(), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_receiver_hears_the_peer_close() {
    let pki = Pki::new("ca");
    let (_a, _b, ab, ba) = session_pair(&pki, Limits::default(), Limits::default()).await;
    let waiting = ba.recv();
    tokio::pin!(waiting);
    // Polled once: it waits before the peer goes.
    assert!((&mut waiting).now_or_never().is_none(), "nothing was sent");
    ab.close();
    let r = tokio::time::timeout(LONG, waiting).await.expect("the receiver hears of the end");
    assert!(matches!(r, Err(Error::Closed | Error::ConnectionLost { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_caller_hears_the_peer_close() {
    let pki = Pki::new("ca");
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let router = Router::new().handle("hold", move |_call: Call, ()| {
        let started = started_tx.clone();
        async move {
            started.send(()).unwrap();
            std::future::pending::<()>().await;
            Ok::<_, ApplicationError>(())
        }
    });
    let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()));
    let b = bind(NodeConfig::new(pki.identity("b"), pki.trust()).rpc(router));
    let (ab, ba) = connect(&a, &b, "b").await;
    let (ab, ba) = (ab.unwrap(), ba.unwrap());
    let call = tokio::spawn(async move { ab.request::<_, ()>("hold", &(), Duration::from_secs(60)).await });
    tokio::time::timeout(LONG, started.recv()).await.unwrap().unwrap();
    drop(ba);
    let r = tokio::time::timeout(LONG, call).await.expect("the caller hears of the end").unwrap();
    assert!(matches!(r, Err(Error::Closed | Error::ConnectionLost { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_receivers_take_every_message_once() {
    let pki = Pki::new("ca");
    let (_a, _b, ab, ba) = session_pair(&pki, Limits::default(), Limits::default()).await;
    let receiver = |s: quicseal::Session| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            while let Ok(m) = s.recv().await {
                got.push(m.decode::<u32>().unwrap());
            }
            got
        })
    };
    let (one, two) = (receiver(ba.clone()), receiver(ba.clone()));
    for n in 0..2000u32 {
        ab.send(0, &n).await.unwrap();
    }
    tokio::time::timeout(LONG, ab.delivered(0)).await.unwrap().unwrap();
    ab.close();
    let (mut one, two) = (one.await.unwrap(), two.await.unwrap());
    let each_in_order = |v: &[u32]| v.windows(2).all(|w| w[0] < w[1]);
    assert!(each_in_order(&one) && each_in_order(&two));
    one.extend(two);
    one.sort_unstable();
    assert_eq!(one, (0..2000).collect::<Vec<_>>());
}

#[test]
fn a_receiver_outside_the_runtime_gets_its_messages() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let pki = Pki::new("ca");
    let (_a, _b, ab, ba) = runtime.block_on(async { session_pair(&pki, Limits::default(), Limits::default()).await });
    // A receiver that stopped waiting (a timeout dropped its `recv`) leaves nothing behind.
    let early = runtime.block_on(async { tokio::time::timeout(Duration::from_millis(50), ba.recv()).await });
    assert!(early.is_err(), "nothing was sent yet");
    // A thread outside the runtime, with an executor of its own.
    let receiving = ba.clone();
    let receiver = std::thread::spawn(move || {
        (0..3u32).map(|_| block_on(receiving.recv()).unwrap().decode::<u32>().unwrap()).collect::<Vec<_>>()
    });
    runtime.block_on(async {
        for n in 0..3u32 {
            ab.send(0, &n).await.unwrap();
        }
        tokio::time::timeout(LONG, ab.delivered(0)).await.unwrap().unwrap();
    });
    assert_eq!(receiver.join().unwrap(), [0, 1, 2]);
}
