//! The `skusync` commands that README.md and docs/*.md show in their `sh`, `bash` and
//! `console` code blocks run as written, so they cannot rot: `check`, `status`,
//! `setup --print` and `tail` against a real throwaway stack set up the documented way
//! (`sql/demo_schema.sql`, `sql/setup.sql`, the example config `dist/skusync.toml` with its
//! URLs pointed at the test's servers, `skusync run` streaming), each with the exit code a
//! healthy setup gives; every other `skusync` command shown must at least be accepted by
//! the command line parser (no usage error).

use crate::harness::{MosquittoServer, PgServer, RedisServer, free_port, wait_until};
use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// One `skusync` command found in a code block.
#[derive(Debug, Clone)]
struct DocCommand {
    /// `file:line`, for the failure message.
    at: String,
    /// The line as written.
    line: String,
    /// The arguments after the binary, as sh would split them (redirections dropped).
    args: Vec<String>,
}

impl DocCommand {
    /// The subcommand: the first argument that is no option (nor an option's value).
    fn subcommand(&self) -> Option<&str> {
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                // global options taking a value
                "--config" | "-c" | "--log-format" | "--log" => {
                    it.next();
                }
                a if a.starts_with('-') => {}
                a => return Some(a),
            }
        }
        None
    }

    /// The arguments with any config file replaced by `config` (the test's copy).
    fn args_with_config(&self, config: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if a == "--config" || a == "-c" {
                out.push(a.clone());
                it.next();
                out.push(config.to_string());
            } else if a.starts_with("--config=") {
                out.push(format!("--config={config}"));
            } else {
                out.push(a.clone());
            }
        }
        out
    }
}

/// Shell words of `line` as sh splits them (quotes, backslashes, comments), split into
/// commands at `|`, `;`, `&&`, `||` and `&`; redirections and their targets are dropped.
fn shell_commands(line: &str) -> Vec<Vec<String>> {
    let mut commands = vec![Vec::new()];
    let mut word = String::new();
    let mut in_word = false;
    let mut drop_next_word = false;
    let mut chars = line.chars().peekable();
    fn end_word(
        word: &mut String,
        in_word: &mut bool,
        drop: &mut bool,
        commands: &mut [Vec<String>],
    ) {
        if *in_word {
            if *drop {
                *drop = false;
            } else {
                commands.last_mut().expect("one").push(std::mem::take(word));
            }
        }
        word.clear();
        *in_word = false;
    }
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            '#' if !in_word => break,
            c if c.is_whitespace() => {
                end_word(&mut word, &mut in_word, &mut drop_next_word, &mut commands)
            }
            '>' | '<' => {
                // `2>file`, `>>file`, `>&2`: the descriptor and the target go
                if in_word && word.chars().all(|c| c.is_ascii_digit()) {
                    word.clear();
                    in_word = false;
                }
                end_word(&mut word, &mut in_word, &mut drop_next_word, &mut commands);
                while chars.peek().is_some_and(|c| matches!(c, '>' | '&')) {
                    chars.next();
                }
                drop_next_word = true;
            }
            '|' | ';' | '&' => {
                end_word(&mut word, &mut in_word, &mut drop_next_word, &mut commands);
                while chars.peek().is_some_and(|c| matches!(c, '|' | '&')) {
                    chars.next();
                }
                commands.push(Vec::new());
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    end_word(&mut word, &mut in_word, &mut drop_next_word, &mut commands);
    commands.retain(|c| !c.is_empty());
    commands
}

/// Every `skusync` command in the `sh`/`bash`/`console` code blocks of `text` (in a
/// `console` block only the `$ ` lines are commands).
fn doc_commands(file: &str, text: &str) -> Vec<DocCommand> {
    let mut out = Vec::new();
    let mut block: Option<String> = None;
    let mut pending = String::new();
    for (n, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            block = match block {
                Some(_) => None,
                None => Some(info.trim().to_string()),
            };
            pending.clear();
            continue;
        }
        let Some(lang) = block.as_deref() else {
            continue;
        };
        let line = match lang {
            "sh" | "bash" | "shell" => trimmed,
            "console" => match trimmed.strip_prefix("$ ") {
                Some(l) => l,
                None => continue,
            },
            _ => continue,
        };
        // a trailing backslash continues the command on the next line
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        for words in shell_commands(&line) {
            // VAR=value assignments may come before the program
            let Some(bin) = words.iter().position(|w| !is_assignment(w)) else {
                continue;
            };
            let prog = &words[bin];
            if prog == "skusync" || prog.ends_with("/skusync") {
                out.push(DocCommand {
                    at: format!("{file}:{}", n + 1),
                    line: line.clone(),
                    args: words[bin + 1..].to_vec(),
                });
            }
        }
    }
    out
}

fn is_assignment(w: &str) -> bool {
    w.split_once('=').is_some_and(|(k, _)| {
        !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    })
}

/// README.md and docs/*.md, with their names relative to the repository.
fn doc_files() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
        .into_iter()
        .map(|p| {
            let name = p.strip_prefix(root).expect("in repo").display().to_string();
            (name, std::fs::read_to_string(&p).expect("read doc"))
        })
        .collect()
}

/// `dist/skusync.toml` with every server URL pointed at the test's servers (and the
/// metrics listener at a free port); everything else as shipped.
fn example_config(pg: &PgServer, redis: &RedisServer, mqtt: &MosquittoServer) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("dist/skusync.toml")).expect("example config");
    let mut replaced = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            let Some(value) = l.strip_prefix("url = \"") else {
                return l.to_string();
            };
            replaced += 1;
            if value.starts_with("postgresql://") {
                // the role and database of the example, on the test's server without TLS
                format!(
                    "url = \"postgresql://skusync@127.0.0.1:{}/inventory?sslmode=disable&application_name=skusync\"",
                    pg.port()
                )
            } else if value.starts_with("redis://") {
                format!("url = \"{}\"", redis.url())
            } else if value.starts_with("mqtt://") {
                format!("url = \"{}\"", mqtt.url())
            } else {
                panic!("an example URL this test does not know how to point at a test server: {l}")
            }
        })
        .map(|l| {
            if l.starts_with("listen = \"127.0.0.1:") {
                format!("listen = \"127.0.0.1:{}\"", free_port())
            } else {
                l
            }
        })
        .collect();
    assert_eq!(
        replaced, 3,
        "postgres, redis and mqtt URLs in dist/skusync.toml"
    );
    lines.join("\n") + "\n"
}

/// Run `args` in `dir` (where the config is `skusync.toml`, also in `SKUSYNC_CONFIG`, as
/// the demo's export line sets it); (exit code, stdout, stderr).
fn run_in(dir: &Path, args: &[String]) -> (i32, String, String) {
    let out = Command::new(skusync_bin())
        .args(args)
        .current_dir(dir)
        .env("SKUSYNC_CONFIG", dir.join("skusync.toml"))
        .env_remove("RUST_LOG")
        .env_remove("SKUSYNC_USER_KEY")
        .output()
        .expect("run skusync");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shell_words_are_split_as_sh_does() {
    assert_eq!(
        shell_commands("./target/release/skusync tail --config skusync.toml    # one JSON line"),
        vec![vec![
            "./target/release/skusync",
            "tail",
            "--config",
            "skusync.toml"
        ]]
    );
    assert_eq!(
        shell_commands(
            "skusync setup --print -c 'my cfg.toml' > setup.sql 2>&1 | less; echo \"a # b\""
        ),
        vec![
            vec!["skusync", "setup", "--print", "-c", "my cfg.toml"],
            vec!["less"],
            vec!["echo", "a # b"],
        ]
    );
    let found = doc_commands(
        "x.md",
        "```sh\nA=1 skusync status \\\n  --json\ncp a b\n```\n```text\nskusync run\n```\n\
         ```console\n$ skusync check\nok   postgres connection\n```\n",
    );
    let args: Vec<Vec<String>> = found.iter().map(|c| c.args.clone()).collect();
    assert_eq!(args, vec![vec!["status", "--json"], vec!["check"]]);
    assert_eq!(found[0].subcommand(), Some("status"));
    assert_eq!(found[0].at, "x.md:3");
}

#[test]
fn the_commands_the_docs_show_run_as_written() {
    let commands: Vec<DocCommand> = doc_files()
        .iter()
        .flat_map(|(name, text)| doc_commands(name, text))
        .collect();
    let runnable = |c: &DocCommand| match c.subcommand() {
        Some("check" | "status" | "tail") => true,
        Some("setup") => c.args.iter().any(|a| a == "--print"),
        _ => false,
    };
    // the docs show each of these at least once (README quick start, docs/operations.md)
    for (sub, print) in [
        ("check", false),
        ("status", false),
        ("tail", false),
        ("setup", true),
    ] {
        assert!(
            commands.iter().any(|c| c.subcommand() == Some(sub)
                && (!print || c.args.iter().any(|a| a == "--print"))),
            "no `skusync {sub}{}` in a code block of README.md or docs/:\n{commands:#?}",
            if print { " --print" } else { "" }
        );
    }

    // every other command shown must at least parse: with a config file that does not
    // exist, a parsed command line stops at the config, a bad one at the usage
    let nowhere = tempfile::tempdir().expect("tempdir");
    for c in commands.iter().filter(|c| !runnable(c)) {
        let (code, _, err) = run_in(nowhere.path(), &c.args_with_config("missing.toml"));
        assert!(
            code == 0 || (!err.contains("Usage:") && err.contains("cannot read config file")),
            "{}: `{}` is not a valid command line (exit {code}):\n{err}",
            c.at,
            c.line
        );
    }

    // the documented setup: demo schema, sql/setup.sql, the example config
    let pg = PgServer::start();
    let redis = RedisServer::start();
    let mqtt = MosquittoServer::start();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    pg.create_db("inventory");
    for script in ["sql/demo_schema.sql", "sql/setup.sql"] {
        let sql = std::fs::read_to_string(root.join(script)).expect("sql script");
        pg.psql_db("inventory", &sql);
    }
    pg.psql_db(
        "inventory",
        "INSERT INTO inventory (sku, location, on_hand) VALUES ('SKU-1', 'WH-1', 5);",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("skusync.toml"),
        example_config(&pg, &redis, &mqtt),
    )
    .expect("write config");
    let cfg = dir.path().join("skusync.toml");
    let mut daemon = SkusyncProc::spawn(
        &["run", "--config", cfg.to_str().expect("utf-8")],
        dir.path(),
    );
    let booted = wait_until(Duration::from_secs(20), || {
        redis.cli(&["HGET", "skusync:meta", "bootstrap"]) == "done"
    });
    assert!(
        booted,
        "skusync run did not load Redis:\n{}",
        daemon.stderr()
    );

    let mut ran = 0;
    for c in commands.iter().filter(|c| runnable(c)) {
        let args = c.args_with_config("skusync.toml");
        let what = format!("{}: `{}`", c.at, c.line);
        eprintln!("running {what}");
        if c.subcommand() == Some("tail") {
            // spawned from the test's directory: the config by its full path
            let args = c.args_with_config(cfg.to_str().expect("utf-8"));
            run_tail(&pg, dir.path(), &args, &what);
            ran += 1;
            continue;
        }
        let (code, out, err) = run_in(dir.path(), &args);
        assert_eq!(code, 0, "{what} exits {code}:\n{out}\n{err}");
        match c.subcommand() {
            Some("check") => assert!(out.contains("ready: 0 failed"), "{what}:\n{out}"),
            Some("status") if args.iter().any(|a| a == "--json") => {
                let v: serde_json::Value = serde_json::from_str(&out)
                    .unwrap_or_else(|e| panic!("{what}: not JSON ({e}):\n{out}"));
                assert_eq!(v["ok"], true, "{what}: {v}");
            }
            Some("status") => assert!(out.contains("bootstrap:     done"), "{what}:\n{out}"),
            _ => assert!(out.contains("COMMIT;"), "{what}:\n{out}"),
        }
        ran += 1;
    }
    assert!(ran >= 4, "ran {ran} commands");
    assert_eq!(
        daemon.signal_and_wait("TERM", Duration::from_secs(20)),
        Some(0),
        "{}",
        daemon.stderr()
    );
}

/// `tail` as written: it prints a change made after it started, and stops on Ctrl-C.
fn run_tail(pg: &PgServer, dir: &Path, args: &[String], what: &str) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cfg = dir.join("skusync.toml");
    let mut tail = SkusyncProc::spawn_env(
        &args,
        dir,
        &[("SKUSYNC_CONFIG", cfg.to_str().expect("utf-8"))],
    );
    let slot = "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'skusync_tail_%' AND active";
    let started = wait_until(Duration::from_secs(20), || {
        pg.psql_db("inventory", slot) == "1" || tail.child.try_wait().ok().flatten().is_some()
    });
    assert!(
        started && tail.child.try_wait().ok().flatten().is_none(),
        "{what} did not start:\n{}",
        tail.stderr()
    );
    pg.psql_db(
        "inventory",
        "UPDATE inventory SET on_hand = on_hand + 1 WHERE sku = 'SKU-1';",
    );
    let line = tail
        .next_line(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{what} printed nothing:\n{}", tail.stderr()));
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line}"));
    assert_eq!(v["table"], "public.inventory", "{what}: {line}");
    assert_eq!(
        tail.signal_and_wait("INT", Duration::from_secs(10)),
        Some(0),
        "{what} on Ctrl-C:\n{}",
        tail.stderr()
    );
}
