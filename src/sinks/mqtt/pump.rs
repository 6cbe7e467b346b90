//! The rumqttc event loop in a task of its own.
//!
//! rumqttc sends queued publishes and reads acknowledgements only while its event loop is
//! polled. The publisher used to poll it between its Redis round trips; brokers allow few
//! unacknowledged messages (Mosquitto: 20), so while Redis was busy with a long apply
//! call, the window stayed full of acknowledgements nobody read, and catching up
//! published 200-600 messages per second. The pump keeps polling meanwhile and queues
//! the events for the publisher, which handles them in order as before.

use std::sync::{Arc, Mutex};

use rumqttc::v5::{ConnectionError, Event, EventLoop, MqttOptions};
use tokio::sync::{Notify, mpsc};

/// Events the pump hands over at most before it waits for the publisher (back-pressure:
/// rumqttc then stops reading the socket).
const PUMP_CAP: usize = 1024;

/// Polls a rumqttc event loop in a task of its own and hands its events over in order.
/// After a connection error it waits for [`Pump::resume`] before polling again (which
/// reconnects), so the publisher decides when; requests still queued then are dropped,
/// so nothing it queued before it saw the error is sent on a connection it does not know
/// about. Stops when dropped.
pub struct Pump {
    rx: mpsc::Receiver<Result<Event, ConnectionError>>,
    resume: Arc<Notify>,
    /// Options (another broker) for the next connection, taken on resume.
    next: Arc<Mutex<Option<MqttOptions>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Pump {
    /// Start polling `el`.
    pub fn start(mut el: EventLoop) -> Pump {
        let (tx, rx) = mpsc::channel(PUMP_CAP);
        let resume = Arc::new(Notify::new());
        let go = resume.clone();
        let next: Arc<Mutex<Option<MqttOptions>>> = Arc::default();
        let take = next.clone();
        let task = tokio::spawn(async move {
            loop {
                let ev = el.poll().await;
                let failed = ev.is_err();
                if tx.send(ev).await.is_err() {
                    return;
                }
                if failed {
                    go.notified().await;
                    // Requests queued after the error (before the publisher handled it)
                    // are still in rumqttc's channel and would go out first on the new
                    // connection, shifting the tracker's pkid mapping by one each. The
                    // publisher counted them lost: drop them (clean session, nothing
                    // resumes), so the new connection carries only what it queues next.
                    el.clean();
                    el.pending.clear();
                    if let Some(o) = take.lock().ok().and_then(|mut g| g.take()) {
                        el.options = o;
                    }
                }
            }
        });
        Pump {
            rx,
            resume,
            next,
            task,
        }
    }

    /// The next event, in order; an error means the connection was lost (call
    /// [`Pump::resume`] to reconnect).
    pub async fn next(&mut self) -> Result<Event, ConnectionError> {
        match self.rx.recv().await {
            Some(ev) => ev,
            // the pump task ended (panicked): report it as a lost connection
            None => Err(ConnectionError::RequestsDone),
        }
    }

    /// An event that is already there.
    pub fn try_next(&mut self) -> Option<Result<Event, ConnectionError>> {
        self.rx.try_recv().ok()
    }

    /// Poll again after an error (reconnect).
    pub fn resume(&self) {
        self.resume.notify_one();
    }

    /// Poll again after an error, connecting with `options` (another broker).
    pub fn resume_with(&self, options: MqttOptions) {
        if let Ok(mut g) = self.next.lock() {
            *g = Some(options);
        }
        self.resume.notify_one();
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.task.abort();
    }
}
