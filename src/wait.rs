//! Waiting for a condition that a [`Notify`] announces changes of.

use tokio::sync::Notify;

/// Resolves once `done` holds, re-checking whenever `signal` is notified (registered before each
/// check, so a notification in between is never missed; `notify_waiters` suffices).
pub(crate) async fn until(signal: &Notify, done: impl Fn() -> bool) {
    loop {
        let notified = signal.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}
