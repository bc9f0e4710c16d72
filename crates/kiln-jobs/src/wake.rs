//! Waking workers after an enqueue commits, batched across concurrent callers.

use crate::{Result, apalis};

/// Wake-ups for workers of tasks already committed, sent group-commit style: a caller with
/// one to send queues it and, unless another caller is sending already, sends everything
/// queued, round after round, until nothing is left; each round is one small transaction that
/// does not wait for a WAL flush (a lost wake-up only means the task waits for a worker's next
/// look, at its heartbeat).
/// PostgreSQL serializes the commits of notifying transactions, so under load one round for
/// many tasks costs what one wake-up would.
#[derive(Debug, Default)]
pub struct Wakes {
    state: std::sync::Mutex<WakeState>,
}

#[derive(Debug, Default)]
struct WakeState {
    /// (queue, task id)
    queued: Vec<(&'static str, String)>,
    sending: bool,
}

/// Clears `sending` if the sender stops early (failed, or its future dropped); a normal finish
/// clears it itself, under the same lock that finds the queue empty, so a wake-up queued just
/// then is not left without a sender.
struct Sending<'a>(&'a Wakes);

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.lock().sending = false;
    }
}

impl Wakes {
    fn lock(&self) -> std::sync::MutexGuard<'_, WakeState> {
        // A panic elsewhere cannot leave the queue in a state worth refusing.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) async fn send(
        &self,
        c: &mut sqlx::PgConnection,
        wake: (&'static str, String),
    ) -> Result<()> {
        {
            let mut s = self.lock();
            s.queued.push(wake);
            if s.sending {
                return Ok(());
            }
            s.sending = true;
        }
        let sending = Sending(self);
        loop {
            let round = {
                let mut s = self.lock();
                if s.queued.is_empty() {
                    s.sending = false;
                    drop(s);
                    std::mem::forget(sending);
                    return Ok(());
                }
                std::mem::take(&mut s.queued)
            };
            let (queues, ids): (Vec<&'static str>, Vec<String>) = round.into_iter().unzip();
            apalis::wake_now(c, &queues, &ids).await?;
        }
    }
}
