//! The code layout shows the data flow: modules depend one way. A module that reaches
//! back to one that depends on it (config <-> a sink's payload names, telemetry <-> the
//! sinks it counts) fails here, naming the cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The module a source file belongs to: top level (`config`, `fold`, ...), and each
/// sink on its own (`sinks::mqtt`), since the sinks are independent of each other.
fn module_of(rel: &Path) -> Option<String> {
    let parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [one] if one == "lib" || one == "main" => None,
        [s, sink, ..] if s == "sinks" && sink != "mod" => Some(format!("sinks::{sink}")),
        [first, ..] => Some(first.clone()),
        [] => None,
    }
}

/// `crate::<module>` paths in code (comments and unit tests left out), grouped imports
/// (`crate::{a, b}`, `crate::sinks::{mqtt, redis}`, over several lines) included.
fn uses(src: &str) -> BTreeSet<String> {
    let code = src.split("#[cfg(test)]\nmod tests").next().unwrap_or(src);
    let code: String = code
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        paths(&code[i + 7..], "", &mut out);
    }
    out
}

/// The modules named at the start of `rest` (what follows `crate::` or `crate::sinks::`):
/// one identifier, or each item of a `{...}` group. `under` is `sinks::` inside the sinks.
fn paths(rest: &str, under: &str, out: &mut BTreeSet<String>) {
    let rest = rest.trim_start();
    if let Some(group) = rest.strip_prefix('{') {
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    paths(&group[start..i], under, out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    paths(&group[start..i], under, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let name: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if name == "self" || !name.starts_with(|c: char| c.is_lowercase()) {
        return;
    }
    match rest[name.len()..].strip_prefix("::") {
        Some(sub) if under.is_empty() && name == "sinks" => paths(sub, "sinks::", out),
        _ => {
            out.insert(format!("{under}{name}"));
        }
    }
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("src") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let Some(m) = module_of(p.strip_prefix(&root).expect("under src")) else {
                continue;
            };
            let src = std::fs::read_to_string(&p).expect("read");
            let deps = g.entry(m.clone()).or_default();
            for d in uses(&src) {
                if d != m && !m.starts_with(&format!("{d}::")) {
                    deps.insert(d);
                }
            }
        }
    }
    g
}

/// A path from `from` back to `to` along the edges, if any.
fn path(
    g: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    to: &str,
    seen: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if from == to {
        return Some(vec![to.to_string()]);
    }
    if !seen.insert(from.to_string()) {
        return None;
    }
    for next in g.get(from).into_iter().flatten() {
        if let Some(mut p) = path(g, next, to, seen) {
            p.insert(0, from.to_string());
            return Some(p);
        }
    }
    None
}

#[test]
fn the_modules_import_each_other_without_cycles() {
    let g = graph();
    assert!(
        g.contains_key("fold") && g.contains_key("sinks::mqtt"),
        "{g:?}"
    );
    let mut cycles = Vec::new();
    for (m, deps) in &g {
        for d in deps {
            if let Some(p) = path(&g, d, m, &mut BTreeSet::new()) {
                cycles.push(format!("{m} -> {}", p.join(" -> ")));
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    // the checker itself: a back edge is found
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("config".into())
        .or_default()
        .insert("sinks::mqtt".into());
    g.entry("sinks::mqtt".into())
        .or_default()
        .insert("config".into());
    assert!(path(&g, "sinks::mqtt", "config", &mut BTreeSet::new()).is_some());
    assert_eq!(
        uses(
            "use crate::sinks::mqtt::payload;\n// crate::telemetry\nlet x = crate::fold::Fold::new;"
        ),
        ["fold".to_string(), "sinks::mqtt".to_string()]
            .into_iter()
            .collect()
    );
    // grouped imports, over lines, nested
    let want: BTreeSet<String> = ["config", "fold", "sinks::history", "sinks::layout", "units"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(
        uses(
            "use crate::{\n    config::{Config, webhook},\n    fold,\n};\n\
             use crate::sinks::{history, layout::{self, sku_key}};\nuse crate::units;"
        ),
        want
    );
}
