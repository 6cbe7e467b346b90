//! The `skusync` command line.

use clap::{Parser, Subcommand, ValueEnum};
use skusync::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Stream a PostgreSQL inventory database's WAL into Redis counters and MQTT topics.
#[derive(Parser, Debug)]
#[command(name = "skusync", version, about)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short = 'c', env = "SKUSYNC_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter, RUST_LOG syntax (e.g. `info`, `skusync=debug`). RUST_LOG overrides it.
    #[arg(long, default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon in the foreground: stream the slot into Redis and MQTT.
    Run,
    /// Rebuild Redis from a fresh snapshot now (skusync must not be running).
    Resync,
    /// Print each decoded change as one JSON line (from a temporary slot by default).
    Tail {
        /// Read the configured slot instead, without confirming (the slot does not move).
        #[arg(long)]
        from_slot: bool,
        /// Print mapped user columns as they are instead of as their HMAC (the value
        /// skusync counts).
        #[arg(long)]
        raw: bool,
    },
    /// Preflight against the real servers: one line per check (ok / WARN / FAIL) with
    /// the SQL or setting that fixes each problem. Exit 0 only when `run` would work.
    Check,
    /// Create the publications for the mapped tables (stock tables in the first configured
    /// publication, activity logs insert-only in the second); adds missing tables to
    /// existing ones. Creates no slot: `run` does, with its snapshot.
    Setup {
        /// Print the SQL (with a commented least-privilege role section) for a DBA to
        /// review and run with `psql -v ON_ERROR_STOP=1`, instead of running it.
        #[arg(long)]
        print: bool,
    },
    /// Slot, lag, Redis progress and last publish. Exit 1 when the slot is missing or
    /// lost or the lag exceeds --max-lag-bytes, 2 on configuration/connection errors.
    Status {
        /// Print one JSON object (for scripts).
        #[arg(long)]
        json: bool,
        /// Lag in WAL bytes above which the exit code is 1.
        #[arg(long, default_value_t = skusync::ops::status::DEFAULT_MAX_LAG_BYTES)]
        max_lag_bytes: u64,
    },
    /// Compare every SKU in Redis (with --mqtt also the retained MQTT state) with the SQL
    /// aggregate of the mapped tables, on a live database without stopping skusync.
    /// Prints `DIFF <sku> <field> redis=<v> sql=<v>` lines and a summary. Exit 0 when
    /// equal, 1 on differences, 2 on configuration/connection errors. Read-only unless
    /// --repair.
    Verify {
        /// Also compare the retained `<topic_prefix>/sku/+` messages with Redis.
        #[arg(long)]
        mqtt: bool,
        /// On differences, make the running skusync rebuild Redis from a fresh snapshot
        /// (meta `bootstrap=stale`), wait for it, and verify again.
        #[arg(long)]
        repair: bool,
        /// Print one JSON object (for scripts).
        #[arg(long)]
        json: bool,
        /// Longest wait, in seconds, for skusync to apply up to each SQL snapshot.
        #[arg(long, default_value_t = 60)]
        wait: u64,
        /// Most rounds; SKUs that change or differ are checked again with a fresh snapshot.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Longest wait, in seconds, for the rebuild --repair requests.
        #[arg(long, default_value_t = 600)]
        repair_wait: u64,
    },
    /// Print a signed bearer token for the `[api]` endpoints (needs `api.token_key_file`).
    Token {
        /// Who the token is for (1-64 of A-Z a-z 0-9 _ -); each subject has its own rate limit.
        #[arg(long)]
        subject: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
    },
    /// Uninstall from the database: drop the slot (terminating a walsender that holds it)
    /// and the publications `skusync setup` created. Stop skusync first. Idempotent.
    DropSlot,
}

fn init_logging(cli: &Cli) {
    // redis-rs' cluster client logs every reconnect attempt of a failover at WARN, many
    // times a second; skusync logs its own retries once per backoff. Unless the filter
    // names `redis` itself, only redis-rs' errors pass.
    let quiet = |f: tracing_subscriber::EnvFilter, spec: &str| {
        if spec.contains("redis") {
            f
        } else {
            f.add_directive("redis=error".parse().expect("a valid directive"))
        }
    };
    let filter = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(f) => quiet(f, &std::env::var("RUST_LOG").unwrap_or_default()),
        Err(_) => tracing_subscriber::EnvFilter::try_new(&cli.log)
            .map(|f| quiet(f, &cli.log))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,redis=error")),
    };
    // Colour only for a terminal: log files and journald get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn load_config(cli: &Cli) -> Result<Config, String> {
    let path = cli
        .config
        .as_ref()
        .ok_or("no configuration: pass --config FILE or set SKUSYNC_CONFIG")?;
    Config::load(path).map_err(|e| e.to_string())
}

/// Cancel `token` on SIGINT or SIGTERM.
fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received; finishing in-flight work");
        token.cancel();
    });
}

/// The operator commands (`check`, `setup`, `status`, `verify`, `drop-slot`), which choose their own
/// exit codes; `None` for the daemon commands.
async fn ops_command(command: &Command, cfg: &Config) -> Option<ExitCode> {
    use skusync::ops;
    use std::io::Write;
    let mut out = std::io::stdout();
    let done = |r: Result<(), String>| match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    };
    Some(match command {
        Command::Run | Command::Resync | Command::Tail { .. } => return None,
        Command::Token { subject, ttl } => {
            let Some(f) = cfg.api.as_ref().and_then(|a| a.token_key_file.as_ref()) else {
                eprintln!("error: `token` needs api.token_key_file in the configuration");
                return Some(ExitCode::from(2));
            };
            done(
                skusync::api::issue_token(f, subject, std::time::Duration::from_secs(*ttl)).map(
                    |t| {
                        let _ = writeln!(out, "{t}");
                    },
                ),
            )
        }
        Command::Check => {
            if ops::check::run(cfg, &mut out).await {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Setup { print: true } => done(ops::setup::print_sql(cfg).await.map(|sql| {
            let _ = out.write_all(sql.as_bytes());
        })),
        Command::Setup { print: false } => done(ops::setup::run(cfg, &mut out).await),
        Command::Status {
            json,
            max_lag_bytes,
        } => match ops::status::gather(cfg, *max_lag_bytes).await {
            Ok(st) => {
                let text = if *json {
                    serde_json::to_string(&st).unwrap_or_default() + "\n"
                } else {
                    ops::status::render_text(&st)
                };
                let _ = out.write_all(text.as_bytes());
                if st.ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::DropSlot => done(ops::drop_slot::run(cfg, &mut out).await),
        Command::Verify {
            mqtt,
            repair,
            json,
            wait,
            rounds,
            repair_wait,
        } => {
            let opts = ops::verify::Options {
                wait: std::time::Duration::from_secs(*wait),
                rounds: *rounds,
                mqtt: *mqtt,
                repair: *repair,
                repair_wait: std::time::Duration::from_secs(*repair_wait),
            };
            match ops::verify::run(cfg, &opts).await {
                Ok(r) => {
                    let text = if *json {
                        serde_json::to_string(&r).unwrap_or_default() + "\n"
                    } else {
                        ops::verify::render_text(&r)
                    };
                    let _ = out.write_all(text.as_bytes());
                    if r.ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
    })
}

/// glibc's malloc raises its mmap threshold each time a large block is freed, so the
/// multi-megabyte vectors of a batch (entries, script arguments) soon come from the heap,
/// where fragmentation keeps their pages after they are freed: on a 1M-row transaction
/// that held RSS near 80 MiB for 26 MiB of live data. Fixed thresholds give large blocks
/// back to the kernel on free and trim the heap's top; fewer arenas than threads keep
/// per-thread free lists from holding memory each. Called before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_logging(&cli);
    let cfg = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Only what counts distinct users needs their HMAC key; the other commands work
    // without one (`check` reports it missing).
    if matches!(cli.command, Command::Run | Command::Resync)
        && let Err(e) = cfg.require_user_keys()
    {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // One worker: the pipeline holds one apply call in flight and the publisher is one
    // task, so more workers bought no throughput, only cross-thread wake-ups (p99 at
    // 5k tx/s: 39 ms with two workers on two cores, 16 ms with one). The replication
    // reader has a thread of its own (`daemon::spawn_source`). TOKIO_WORKER_THREADS
    // overrides.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(code) = rt.block_on(ops_command(&cli.command, &cfg)) {
        return code;
    }
    let config_problem = std::cell::Cell::new(false);
    let result = rt.block_on(async {
        let shutdown = CancellationToken::new();
        cancel_on_signals(shutdown.clone());
        match &cli.command {
            Command::Run => {
                // READY=1 is sent by the daemon once it streams or waits as a standby.
                let http = cfg.http.clone();
                let api = if cfg.api.is_some() {
                    Some(skusync::api::serve(&cfg, shutdown.clone()).await?)
                } else {
                    None
                };
                let webhooks = skusync::sinks::webhook::spawn(&cfg, shutdown.clone())?;
                let daemon = skusync::daemon::Daemon::new(cfg).map_err(|e| e.to_string())?;
                let metrics = skusync::telemetry::install();
                let _upkeep = skusync::telemetry::spawn_upkeep(metrics.clone());
                if let Some(h) = http {
                    skusync::http::serve(h.listen, metrics, shutdown.clone())
                        .await
                        .map_err(|e| format!("http.listen {}: {e}", h.listen))?;
                }
                let _watchdog = skusync::telemetry::spawn_watchdog();
                skusync::telemetry::ignore_sighup();
                let _ = skusync::notify::status("starting");
                let r = daemon.run(shutdown).await;
                drop(api);
                drop(webhooks);
                let _ = skusync::notify::stopping();
                if let Err(skusync::daemon::DaemonError::Config(e)) = &r {
                    // the mapping does not fit the database: exit 2, as for a bad config
                    config_problem.set(true);
                    return Err(e.clone());
                }
                r.map_err(|e| e.to_string())
            }
            Command::Resync => skusync::daemon::resync_now(cfg)
                .await
                .map_err(|e| e.to_string()),
            Command::Tail { from_slot, raw } => {
                let opts = skusync::tail::TailOptions {
                    from_slot: *from_slot,
                    raw: *raw,
                };
                let mut out = std::io::stdout();
                skusync::tail::run(&cfg, &opts, &mut out, shutdown)
                    .await
                    .map_err(|e| e.to_string())
            }
            // handled by ops_command above
            Command::Check
            | Command::Setup { .. }
            | Command::Status { .. }
            | Command::Verify { .. }
            | Command::Token { .. }
            | Command::DropSlot => Ok(()),
        }
    });
    // Dropping the runtime would wait without end for its blocking threads, and the
    // replication reader runs on one (`daemon::spawn_source`): by now it has stopped or
    // been given up on, so do not let a stuck read hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            if config_problem.get() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
