//! The live-connection registry: every proxied connection to a sandbox (previews, and any
//! other long-lived stream a surface holds) registers here under the sandbox's read lock,
//! and a suspend cuts them all (cancel, then wait until their sockets are gone) under the
//! write lock before it checkpoints: gVisor cannot checkpoint a sandbox holding a connected
//! TCP endpoint, and a WebSocket must not hold off hibernation forever.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How long `cut` waits for cancelled connections to be gone.
pub const CUT_TIMEOUT: Duration = Duration::from_secs(5);
/// Preview traffic resets the idle clock at most this often per sandbox.
pub const TOUCH_EVERY: Duration = Duration::from_secs(1);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Live proxied connections per sandbox, so a suspend can cut them first.
#[derive(Default)]
pub struct LiveConnections {
    /// Per sandbox: the token that cancels its current connections, and how many are live.
    /// The std mutex guards only the map.
    conns: Mutex<HashMap<String, Generation>>,
    /// Per sandbox: when preview traffic last reset its idle clock.
    touched: Mutex<HashMap<String, Instant>>,
}

#[derive(Clone)]
struct Generation {
    cancel: CancellationToken,
    live: Arc<watch::Sender<usize>>,
}

/// One registered connection (or a part of one: a clone counts separately). Holders stop
/// when [`ConnGuard::cancelled`] fires and drop the guard once their socket is gone.
pub struct ConnGuard {
    gen_: Generation,
}

impl ConnGuard {
    fn new(gen_: Generation) -> Self {
        gen_.live.send_modify(|n| *n += 1);
        ConnGuard { gen_ }
    }

    pub fn cancel_token(&self) -> CancellationToken {
        self.gen_.cancel.clone()
    }
}

impl Clone for ConnGuard {
    fn clone(&self) -> Self {
        ConnGuard::new(self.gen_.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.gen_.live.send_modify(|n| *n -= 1);
    }
}

impl LiveConnections {
    /// Register a connection to `sandbox`. Call with the sandbox's read lock held, so it
    /// cannot race a suspend's [`LiveConnections::cut`].
    pub fn register(&self, sandbox: &str) -> ConnGuard {
        let mut map = self.conns.lock().expect("preview map poisoned");
        let gen_ = map
            .entry(sandbox.to_string())
            .or_insert_with(|| Generation {
                cancel: CancellationToken::new(),
                live: Arc::new(watch::channel(0).0),
            })
            .clone();
        ConnGuard::new(gen_)
    }

    /// Cancel every proxied connection of `sandbox` and wait (at most [`CUT_TIMEOUT`]) until
    /// their sockets are closed. Call with the sandbox's write lock held, so none starts
    /// meanwhile. Returns how many were open.
    pub async fn cut(&self, sandbox: &str) -> usize {
        self.touched
            .lock()
            .expect("preview map poisoned")
            .remove(sandbox);
        let Some(gen_) = self
            .conns
            .lock()
            .expect("preview map poisoned")
            .remove(sandbox)
        else {
            return 0;
        };
        let open = *gen_.live.borrow();
        gen_.cancel.cancel();
        let mut rx = gen_.live.subscribe();
        if tokio::time::timeout(CUT_TIMEOUT, rx.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            tracing::error!(
                sandbox,
                left = *gen_.live.borrow(),
                "preview connections outlived their cancellation"
            );
        }
        if open > 0 {
            tracing::info!(sandbox, open, "cut preview connections");
        }
        open
    }

    /// Record preview traffic as activity, at most once per [`TOUCH_EVERY`].
    pub fn touch(&self, store: &Store, sandbox: &str) {
        let now = Instant::now();
        {
            let mut touched = self.touched.lock().expect("preview map poisoned");
            if touched
                .get(sandbox)
                .is_some_and(|t| now.duration_since(*t) < TOUCH_EVERY)
            {
                return;
            }
            touched.insert(sandbox.to_string(), now);
        }
        let store = store.clone();
        let sandbox = sandbox.to_string();
        tokio::spawn(async move {
            if let Err(e) = store.sandboxes.touch(&sandbox, now_ms()).await {
                tracing::warn!(sandbox, error = %e, "recording preview activity");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cut_waits_for_registered_connections() {
        let p = LiveConnections::default();
        assert_eq!(p.cut("sbx").await, 0);
        let g = p.register("sbx");
        let g2 = g.clone();
        let token = g.cancel_token();
        let holder = tokio::spawn(async move {
            token.cancelled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(g);
            drop(g2);
        });
        let started = Instant::now();
        assert_eq!(p.cut("sbx").await, 2);
        assert!(started.elapsed() >= Duration::from_millis(50));
        holder.await.unwrap();
        // A new registration after the cut is not cancelled.
        assert!(!p.register("sbx").cancel_token().is_cancelled());
    }
}
