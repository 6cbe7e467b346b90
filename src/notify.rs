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

/// The watchdog interval systemd asked for, if any: `WATCHDOG_USEC`, for this process
/// when `WATCHDOG_PID` is set (libsystemd's `sd_watchdog_enabled` semantics; an unset
/// `WATCHDOG_PID` means this process).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}
