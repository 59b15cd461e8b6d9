//! The layering rules, checked on the source tree (no services needed):
//!
//! - a stage crate (and the console) depends on `herald-core`, `herald-domain`,
//!   `herald-providers` and `herald-schemas`, never on another stage: what two stages share
//!   lives in the domain;
//! - no crate names a table in SQL but the table's owner: the domain owns every table but the
//!   few a stage keeps for itself ([`STAGE_TABLES`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The stage crates, the console and the gateway included (the `herald` binary links them all).
const STAGES: [&str; 10] = [
    "accept",
    "api",
    "callback",
    "console",
    "delay",
    "notify",
    "projector",
    "render",
    "route",
    "send",
];

/// What a stage crate may depend on among Herald's crates.
const SHARED: [&str; 4] = [
    "herald-core",
    "herald-domain",
    "herald-providers",
    "herald-schemas",
];

/// Tables a stage owns; every other table is the domain's.
const STAGE_TABLES: [(&str, &str); 4] = [
    ("api_nonces", "api"),
    ("policy_hits", "route"),
    ("receipt_ids", "callback"),
    ("console_sessions", "console"),
];

fn processors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("processors")
}

/// The `herald-*` crates a `Cargo.toml` lists under `[dependencies]`.
fn herald_dependencies(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut section = "";
    for line in manifest.lines() {
        let line = line.trim();
        // `[dependencies.herald-x]` names one in its header.
        if let Some(name) = line
            .strip_prefix("[dependencies.")
            .and_then(|l| l.strip_suffix(']'))
            .filter(|n| n.starts_with("herald-"))
        {
            out.push(name.to_owned());
            section = "[dependency]";
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[dependencies]"
            && let Some(name) = line.split(['=', '.', ' ']).next()
            && name.starts_with("herald-")
        {
            out.push(name.to_owned());
        }
    }
    out
}

#[test]
fn no_stage_depends_on_another_stage() {
    let mut wrong = Vec::new();
    for stage in STAGES {
        let manifest =
            std::fs::read_to_string(processors().join(stage).join("Cargo.toml")).unwrap();
        for dep in herald_dependencies(&manifest) {
            if !SHARED.contains(&dep.as_str()) {
                wrong.push(format!("{stage} → {dep}"));
            }
        }
    }
    assert!(wrong.is_empty(), "stage → stage arrows: {wrong:?}");
}

/// The tables the migrations create and have not dropped since.
fn tables() -> Vec<String> {
    let dir = processors().join("domain").join("migrations");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut tables: Vec<String> = Vec::new();
    for f in files {
        let sql = std::fs::read_to_string(&f).unwrap();
        for (prefix, create) in [
            ("CREATE TABLE IF NOT EXISTS ", true),
            ("CREATE TABLE ", true),
            ("DROP TABLE IF EXISTS ", false),
            ("DROP TABLE ", false),
        ] {
            for (at, _) in sql.match_indices(prefix) {
                let name = identifier(&sql[at + prefix.len()..]);
                if name.is_empty() || name == "IF" {
                    continue;
                }
                if create {
                    if !tables.contains(&name) {
                        tables.push(name);
                    }
                } else {
                    tables.retain(|t| *t != name);
                }
            }
        }
    }
    tables
}

fn identifier(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The tables a source text names in SQL (after `FROM`, `INTO`, `UPDATE`, `JOIN`, `TABLE` and
/// any whitespace; SQL here is written in upper case, prose is not).
fn named_tables(source: &str, tables: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for keyword in ["FROM", "INTO", "UPDATE", "JOIN", "TABLE"] {
        for (at, _) in source.match_indices(keyword) {
            let rest = &source[at + keyword.len()..];
            let before = source[..at].chars().next_back();
            if !rest.starts_with(char::is_whitespace)
                || before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                continue;
            }
            let name = identifier(rest.trim_start());
            if tables.contains(&name) && !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn no_crate_but_its_owner_names_a_table() {
    let tables = tables();
    assert!(
        tables.iter().any(|t| t == "messages") && !tables.iter().any(|t| t == "alert_outbox"),
        "migrations read: {tables:?}"
    );
    let owner = |t: &str| {
        STAGE_TABLES
            .iter()
            .find(|(table, _)| *table == t)
            .map_or("domain", |(_, crate_)| crate_)
    };
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(processors()).unwrap() {
        let dir = entry.unwrap().path();
        let crate_ = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut files = Vec::new();
        if dir.join("src").is_dir() {
            rust_files(&dir.join("src"), &mut files);
        }
        for f in files {
            let source = std::fs::read_to_string(&f).unwrap();
            for t in named_tables(&source, &tables) {
                if owner(&t) != crate_ {
                    wrong
                        .entry(format!("{crate_}: {}", f.display()))
                        .or_default()
                        .push(t);
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "tables named outside their owner: {wrong:#?}"
    );
}

#[test]
fn the_checks_see_what_they_look_for() {
    let tables = vec!["messages".to_owned(), "intake".to_owned()];
    assert_eq!(
        named_tables(
            "SELECT app_id FROM\n messages WHERE x IN (SELECT 1 FROM  intake) AND y_FROM messages",
            &tables
        ),
        ["messages", "intake"]
    );
    assert!(named_tables("messages from intake", &tables).is_empty());
    assert_eq!(
        herald_dependencies(
            "[dependencies]\nherald-core.workspace = true\nherald-api = { path = \"x\" }\n\n[dev-dependencies]\nherald-send.workspace = true\n\n[dependencies.herald-route]\npath = \"r\"\n"
        ),
        ["herald-core", "herald-api", "herald-route"]
    );
}
