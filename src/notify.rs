//! systemd notifications (`sd_notify`): READY, STATUS, WATCHDOG, EXTEND_TIMEOUT,
//! STOPPING. All are no-ops when not started by systemd (`NOTIFY_SOCKET` unset).

use std::time::Duration;

/// Tell systemd the service is up.
pub fn ready(status: &str) -> std::io::Result<()> {
    sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ],
    )
}

/// A status line (`systemctl status`).
pub fn status(status: &str) -> std::io::Result<()> {
    sd_notify::notify(false, &[sd_notify::NotifyState::Status(status)])
}

/// Ask for more start-up time (a long snapshot load).
pub fn extend_timeout(by: Duration, status: &str) -> std::io::Result<()> {
    sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::ExtendTimeoutUsec(
                by.as_micros().min(u128::from(u32::MAX)) as u32
            ),
            sd_notify::NotifyState::Status(status),
        ],
    )
}

/// The main loop is alive.
pub fn watchdog() -> std::io::Result<()> {
    sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog])
}

/// Shutting down.
pub fn stopping() -> std::io::Result<()> {
    sd_notify::notify(false, &[sd_notify::NotifyState::Stopping])
}

/// The watchdog interval systemd asked for, if any.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec))
}
