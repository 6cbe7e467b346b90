//! docs/configuration.md documents every key the configuration accepts.
//!
//! The keys come from the code, not from a list kept by hand: every `struct` and `enum`
//! deriving `Deserialize` in `src/` is parsed (with `syn`), and the types are followed
//! from `config::Config` through its fields (serde's `rename`, `skip`, `flatten`, `alias`
//! and `untagged` honoured) down to the keys of inline tables such as a lookup's
//! `{ from, on, ... }`. Each section's keys are also checked against serde itself (the
//! "expected one of ..." list of an unknown key), so this reading of the code cannot drift
//! from what the parser accepts.
//!
//! A key is documented when its section (`### `[name]`` or `### `[[name]]``, up to the
//! next heading of that level) has a table row whose first cell names it in backticks
//! (`` `key` `` or `` `[section.key]` ``). A key of an inline table (a lookup's `from`)
//! needs such a row in a table under a `####` heading of the section, or an inline-table
//! example there that writes it (`` `{ value = "view" }` ``).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A type deriving `Deserialize`, with the file it is in.
struct TypeDef {
    file: PathBuf,
    item: TypeItem,
}

enum TypeItem {
    Struct(syn::ItemStruct),
    Enum(syn::ItemEnum),
}

/// What serde attributes say about a field or a container.
#[derive(Default)]
struct SerdeAttrs {
    rename: Option<String>,
    aliases: Vec<String>,
    skip: bool,
    flatten: bool,
    untagged: bool,
    rename_all: Option<String>,
}

fn serde_attrs(attrs: &[syn::Attribute]) -> SerdeAttrs {
    let mut out = SerdeAttrs::default();
    for a in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        a.parse_nested_meta(|m| {
            let name = m
                .path
                .get_ident()
                .map(|i| i.to_string())
                .unwrap_or_default();
            let string = |m: &syn::meta::ParseNestedMeta| -> syn::Result<String> {
                Ok(m.value()?.parse::<syn::LitStr>()?.value())
            };
            match name.as_str() {
                "rename" if m.input.peek(syn::Token![=]) => out.rename = Some(string(&m)?),
                "rename" => m.parse_nested_meta(|n| {
                    let v = string(&n)?;
                    if n.path.is_ident("deserialize") {
                        out.rename = Some(v);
                    }
                    Ok(())
                })?,
                "alias" => out.aliases.push(string(&m)?),
                "rename_all" => out.rename_all = Some(string(&m)?),
                "skip" | "skip_deserializing" => out.skip = true,
                "flatten" => out.flatten = true,
                "untagged" => out.untagged = true,
                _ if m.input.peek(syn::Token![=]) => {
                    m.value()?.parse::<syn::Expr>()?;
                }
                _ if m.input.peek(syn::token::Paren) => m.parse_nested_meta(|n| {
                    if n.input.peek(syn::Token![=]) {
                        n.value()?.parse::<syn::Expr>()?;
                    }
                    Ok(())
                })?,
                _ => {}
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("cannot read #[serde(...)]: {e}"));
    }
    out
}

fn derives_deserialize(attrs: &[syn::Attribute]) -> bool {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("derive"))
        .any(|a| {
            let mut found = false;
            let _ = a.parse_nested_meta(|m| {
                found |= m
                    .path
                    .segments
                    .last()
                    .is_some_and(|s| s.ident == "Deserialize");
                Ok(())
            });
            found
        })
}

/// Every `Deserialize` type in the `.rs` files under `dir`, by name.
fn deserialize_types(dir: &Path) -> BTreeMap<String, Vec<TypeDef>> {
    let mut out: BTreeMap<String, Vec<TypeDef>> = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read src") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&p).expect("read source");
            let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            for item in file.items {
                let (name, item) = match item {
                    syn::Item::Struct(s) if derives_deserialize(&s.attrs) => {
                        (s.ident.to_string(), TypeItem::Struct(s))
                    }
                    syn::Item::Enum(e) if derives_deserialize(&e.attrs) => {
                        (e.ident.to_string(), TypeItem::Enum(e))
                    }
                    _ => continue,
                };
                out.entry(name).or_default().push(TypeDef {
                    file: p.clone(),
                    item,
                });
            }
        }
    }
    out
}

/// The names of the types a field's type mentions, with the module path written before
/// each (`webhook` for `webhook::WebhookConfig`), generic
/// arguments included (`Option<Vec<X>>` mentions `Option`, `Vec` and `X`).
fn mentioned_types(ty: &syn::Type, out: &mut Vec<(String, Vec<String>)>) {
    match ty {
        syn::Type::Path(p) => {
            let segs: Vec<String> = p
                .path
                .segments
                .iter()
                .map(|s| s.ident.to_string())
                .collect();
            if let Some((last, module)) = segs.split_last() {
                out.push((last.clone(), module.to_vec()));
            }
            for s in &p.path.segments {
                if let syn::PathArguments::AngleBracketed(a) = &s.arguments {
                    for arg in &a.args {
                        if let syn::GenericArgument::Type(t) = arg {
                            mentioned_types(t, out);
                        }
                    }
                }
            }
        }
        syn::Type::Reference(r) => mentioned_types(&r.elem, out),
        syn::Type::Paren(p) => mentioned_types(&p.elem, out),
        syn::Type::Tuple(t) => t.elems.iter().for_each(|e| mentioned_types(e, out)),
        syn::Type::Array(a) => mentioned_types(&a.elem, out),
        syn::Type::Slice(s) => mentioned_types(&s.elem, out),
        _ => {}
    }
}

/// A key of the configuration: where it is and which type declares it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    /// The top-level section it belongs to.
    section: String,
    /// The key as written in TOML.
    name: String,
    /// `Config.field` path for the message (`inventory.sku.then.key`).
    path: String,
    /// Whether it is a key of an inline table below the section's own keys.
    nested: bool,
}

struct Walker<'a> {
    types: &'a BTreeMap<String, Vec<TypeDef>>,
    keys: BTreeSet<Key>,
}

impl<'a> Walker<'a> {
    /// The definition `name` (mentioned in `from`, under `module`) refers to.
    fn resolve(&self, name: &str, module: &[String], from: &Path) -> Option<&'a TypeDef> {
        let defs = self.types.get(name)?;
        if defs.len() == 1 {
            return defs.first();
        }
        // `crate::a::b::Name`: src/a/b.rs or src/a/b/mod.rs
        let by_path = module.first().is_some_and(|c| c == "crate").then(|| {
            let rel: PathBuf = module[1..].iter().collect();
            defs.iter().find(|d| {
                d.file.ends_with(rel.with_extension("rs")) || d.file.ends_with(rel.join("mod.rs"))
            })
        });
        by_path
            .flatten()
            .or_else(|| defs.iter().find(|d| d.file == from))
            .or_else(|| {
                panic!(
                    "{name} is defined more than once; cannot tell which one a config field means"
                )
            })
    }

    /// The keys of struct-like type `def` (fields, or an untagged enum's variants'
    /// fields): (key, its type's mentions, aliases) where each key leads on.
    fn fields(def: &TypeDef) -> Vec<(String, Vec<String>, Vec<syn::Type>)> {
        let named = |fields: &syn::Fields,
                     rename_all: Option<&str>|
         -> Vec<(String, Vec<String>, Vec<syn::Type>)> {
            let mut out = Vec::new();
            for f in fields {
                let a = serde_attrs(&f.attrs);
                if a.skip {
                    continue;
                }
                let Some(ident) = &f.ident else {
                    // a newtype: its type's keys are this level's keys
                    out.push((String::new(), Vec::new(), vec![f.ty.clone()]));
                    continue;
                };
                if a.flatten {
                    out.push((String::new(), Vec::new(), vec![f.ty.clone()]));
                    continue;
                }
                let raw = ident.to_string();
                let raw = raw.strip_prefix("r#").unwrap_or(&raw).to_string();
                let name = a.rename.unwrap_or_else(|| match rename_all {
                    None | Some("snake_case") | Some("lowercase") => raw.clone(),
                    Some("kebab-case") => raw.replace('_', "-"),
                    Some(other) => {
                        panic!("rename_all = {other:?} on a config struct: teach this test")
                    }
                });
                out.push((name, a.aliases, vec![f.ty.clone()]));
            }
            out
        };
        match &def.item {
            TypeItem::Struct(s) => {
                let a = serde_attrs(&s.attrs);
                named(&s.fields, a.rename_all.as_deref())
            }
            TypeItem::Enum(e) => {
                let a = serde_attrs(&e.attrs);
                let mut out = Vec::new();
                for v in &e.variants {
                    match (&v.fields, a.untagged) {
                        (syn::Fields::Unit, _) => {} // a value, not a key
                        (fields, true) => out.extend(named(fields, a.rename_all.as_deref())),
                        (_, false) => panic!(
                            "{}::{}: an externally tagged enum variant with data in the config: teach this test",
                            e.ident, v.ident
                        ),
                    }
                }
                out
            }
        }
    }

    /// Record the keys reachable from `def` in `section`, at `path`.
    fn walk(
        &mut self,
        def: &'a TypeDef,
        section: &str,
        path: &str,
        nested: bool,
        seen: &mut Vec<String>,
    ) {
        let name = match &def.item {
            TypeItem::Struct(s) => s.ident.to_string(),
            TypeItem::Enum(e) => e.ident.to_string(),
        };
        if seen.contains(&name) {
            return; // a recursive type (a lookup's `then`): its keys are recorded
        }
        seen.push(name);
        for (key, aliases, tys) in Self::fields(def) {
            let here = if key.is_empty() {
                path.to_string()
            } else {
                format!("{path}.{key}")
            };
            for k in std::iter::once(&key)
                .chain(&aliases)
                .filter(|k| !k.is_empty())
            {
                self.keys.insert(Key {
                    section: section.to_string(),
                    name: k.clone(),
                    path: here.clone(),
                    nested,
                });
            }
            for ty in tys {
                let mut mentions = Vec::new();
                mentioned_types(&ty, &mut mentions);
                for (t, module) in mentions {
                    if let Some(d) = self.resolve(&t, &module, &def.file) {
                        // a newtype or flattened field stays at this level
                        self.walk(d, section, &here, nested || !key.is_empty(), seen);
                    }
                }
            }
        }
        seen.pop();
    }
}

/// `(section, is an array of tables, section type)` for each field of `Config`, and every
/// key below them.
fn config_keys() -> (Vec<(String, bool, String)>, BTreeSet<Key>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let types = deserialize_types(&src);
    let config = types
        .get("Config")
        .and_then(|d| d.iter().find(|d| d.file.ends_with("src/config/mod.rs")))
        .expect("struct Config in src/config/mod.rs");
    let mut w = Walker {
        types: &types,
        keys: BTreeSet::new(),
    };
    let mut sections = Vec::new();
    for (section, _, tys) in Walker::fields(config) {
        let mut mentions = Vec::new();
        mentioned_types(&tys[0], &mut mentions);
        let array = mentions.iter().any(|(t, _)| t == "Vec");
        let mut ty = String::new();
        for (t, module) in mentions {
            if let Some(d) = w.resolve(&t, &module, &config.file) {
                ty = t.clone();
                w.walk(d, &section, &section, false, &mut vec!["Config".into()]);
            }
        }
        assert!(
            !ty.is_empty(),
            "config section {section} has no Deserialize type"
        );
        sections.push((section, array, ty));
    }
    (sections, w.keys)
}

/// What docs/configuration.md documents in one section.
#[derive(Default, Debug)]
struct DocSection {
    /// First cells of the section's own table rows (before any `####` heading).
    keys: BTreeSet<String>,
    /// First cells of the rows under a `####` heading of the section (inline tables).
    sub_keys: BTreeSet<String>,
    /// Backticked inline-table examples anywhere in the section (`{ value = "view" }`).
    examples: Vec<String>,
}

/// docs/configuration.md, by section name.
fn documented() -> BTreeMap<String, DocSection> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let text = std::fs::read_to_string(path).expect("docs/configuration.md");
    let mut out: BTreeMap<String, DocSection> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_sub = false;
    let backticked = |s: &str| -> Vec<String> {
        s.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    for line in text.lines() {
        if line.starts_with("## ") || line.starts_with("### ") {
            current = backticked(line)
                .into_iter()
                .find(|t| t.starts_with('['))
                .map(|t| t.trim_matches(['[', ']']).to_string())
                .filter(|_| line.starts_with("### "));
            in_sub = false;
            if let Some(s) = &current {
                out.entry(s.clone()).or_default();
            }
            continue;
        }
        let Some(section) = &current else { continue };
        if line.starts_with("#### ") {
            in_sub = true;
            continue;
        }
        let entry = out.get_mut(section).expect("section");
        if let Some(first) = line.strip_prefix('|').and_then(|r| r.split('|').next()) {
            for t in backticked(first) {
                let t = t.trim_matches(['[', ']']);
                let t = t.strip_prefix(&format!("{section}.")).unwrap_or(t);
                if in_sub {
                    entry.sub_keys.insert(t.to_string());
                } else {
                    entry.keys.insert(t.to_string());
                }
            }
        }
        entry
            .examples
            .extend(backticked(line).into_iter().filter(|t| t.contains('{')));
    }
    out
}

/// serde's own list of the keys a table accepts: the "expected one of" of an unknown key.
fn serde_keys(config_text: &str) -> BTreeSet<String> {
    let e = skusync::config::Config::parse(config_text)
        .expect_err("an unknown key is an error")
        .to_string();
    let (_, expected) = e
        .split_once("unknown field `zz_not_a_key`, expected ")
        .unwrap_or_else(|| panic!("not serde's unknown-field message: {e}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn the_code_reading_agrees_with_serde_on_every_sections_keys() {
    let (sections, keys) = config_keys();
    let base = "[postgres]\nurl = \"postgresql://u@h/d\"\n";
    let top: BTreeSet<String> = sections.iter().map(|s| s.0.clone()).collect();
    assert_eq!(
        serde_keys(&format!("zz_not_a_key = 1\n{base}")),
        top,
        "top-level sections"
    );
    for (section, array, _) in &sections {
        let text = if section == "postgres" {
            format!("{base}zz_not_a_key = 1\n")
        } else if *array {
            format!("{base}[[{section}]]\nzz_not_a_key = 1\n")
        } else {
            format!("{base}[{section}]\nzz_not_a_key = 1\n")
        };
        let ours: BTreeSet<String> = keys
            .iter()
            .filter(|k| &k.section == section && !k.nested)
            .map(|k| k.name.clone())
            .collect();
        assert_eq!(serde_keys(&text), ours, "keys of [{section}]");
    }
    // the inline tables are found too (a lookup's keys, `kind = { value }`)
    assert!(keys.iter().any(|k| k.nested), "{keys:#?}");
}

#[test]
fn docs_configuration_md_documents_every_config_key() {
    let (sections, keys) = config_keys();
    let docs = documented();
    let mut missing = Vec::new();
    for (section, array, _) in &sections {
        if !docs.contains_key(section) {
            let h = if *array {
                format!("[[{section}]]")
            } else {
                format!("[{section}]")
            };
            missing.push(format!("section {h}: no `### `{h}`` heading"));
        }
    }
    // a nested key may be documented in any section that reaches it
    let mut by_path: BTreeMap<(String, bool), Vec<&Key>> = BTreeMap::new();
    for k in &keys {
        let id = if k.nested {
            // the same inline-table field reached from several sections: one entry
            k.path
                .split_once('.')
                .map_or(k.path.clone(), |(_, p)| p.to_string())
        } else {
            k.path.clone()
        };
        by_path.entry((id, k.nested)).or_default().push(k);
    }
    for ((id, nested), ks) in by_path {
        let found = ks.iter().any(|k| {
            let Some(doc) = docs.get(&k.section) else {
                return false;
            };
            if !nested {
                return doc.keys.contains(&k.name);
            }
            doc.sub_keys.contains(&k.name)
                || doc.examples.iter().any(|e| {
                    e.contains(&format!("{{ {} =", k.name))
                        || e.contains(&format!(", {} =", k.name))
                })
        });
        if !found {
            let sections: Vec<&str> = ks.iter().map(|k| k.section.as_str()).collect();
            missing.push(format!(
                "{id} (key `{}`, in {})",
                ks[0].name,
                sections.join(" or ")
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document these config keys (a table row whose first \
         cell is the key in backticks, in its section; a key of an inline table in a table \
         under a `####` heading of the section, or in an inline-table example there):\n  {}",
        missing.join("\n  ")
    );
}

/// Every string literal `"skusync_..."` in `src/`, with the file it is in.
fn metric_literals(dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            metric_literals(&p, out);
            continue;
        }
        if p.extension().and_then(|x| x.to_str()) != Some("rs") {
            continue;
        }
        let text = std::fs::read_to_string(&p).expect("read source");
        for (i, _) in text.match_indices("\"skusync_") {
            let rest = &text[i + 1..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            // a literal ending there (not a format string such as a slot name's prefix)
            if rest[end..].starts_with('"') && end > "skusync_".len() {
                out.insert(rest[..end].to_string(), p.clone());
            }
        }
    }
}

/// Telemetry as a spec: each metric the code names follows `skusync_<noun>_<unit>` and
/// has a row in the metrics table of docs/operations.md.
#[test]
fn every_metric_in_the_code_is_named_by_the_convention_and_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut names = BTreeMap::new();
    metric_literals(&root.join("src"), &mut names);
    assert!(names.len() > 20, "found only {names:?}");
    let ops = std::fs::read_to_string(root.join("docs/operations.md")).expect("operations.md");
    let units = [
        "_total", "_bytes", "_seconds", "_bool", "_batches", "_entries", "_alerts",
    ];
    for (name, file) in &names {
        assert!(
            units.iter().any(|u| name.ends_with(u)),
            "{name} ({}) ends in none of the units {units:?}",
            file.display()
        );
        assert!(
            ops.contains(&format!("| `{name}")),
            "{name} ({}) has no row in docs/operations.md's metrics table",
            file.display()
        );
    }
}
