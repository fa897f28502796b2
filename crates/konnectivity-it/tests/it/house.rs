//! The house rules that keep the code changeable, checked over the sources themselves:
//! - modules import one way: no module of any crate imports, directly or through others, a module that imports
//!   it (an import is a `crate::`/`super::` path in code, test modules and comments aside);
//! - no hand-written source file is over [`MAX_FILE_LINES`] lines of code (its test module, generated code and
//!   the integration tests aside).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest a hand-written source file may be, in lines (without its test module).
const MAX_FILE_LINES: usize = 700;

/// A module path inside a crate (`[]` is the crate root).
type ModPath = Vec<String>;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every library crate's `src` folder.
fn crate_sources() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(workspace().join("crates"))
        .expect("crates/")
        .filter_map(|e| e.ok().map(|e| e.path().join("src")))
        .filter(|p| p.join("lib.rs").exists())
        .collect();
    out.sort();
    out
}

/// The crate's module files by module path (binaries, generated code and test-module files left out).
fn modules(src: &Path) -> BTreeMap<ModPath, PathBuf> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<ModPath, PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(src).expect("under src");
            let first = rel.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned());
            if matches!(first.as_deref(), Some("bin" | "gen")) {
                continue;
            }
            if path.is_dir() {
                walk(&path, src, out);
                continue;
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !name.ends_with(".rs") || name.ends_with("_tests.rs") {
                continue;
            }
            let mut parts: ModPath =
                rel.with_extension("").components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            out.insert(parts, path);
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// The code of a source file without comments, with string and character literals emptied, and without its
/// `#[cfg(test)]` items (a test module, inline or in a file of its own). Line breaks are kept.
fn code_of(text: &str) -> String {
    let code = without_literals_and_comments(text);
    let mut out = String::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        // Skip the attribute and the item it marks: up to the end of a `mod x;` or a balanced `{ … }` block.
        let body = after.find(['{', ';']).unwrap_or(after.len());
        let end = if after[body..].starts_with('{') {
            let mut depth = 0usize;
            let mut end = after.len();
            for (i, c) in after[body..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = body + i + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            end
        } else {
            (body + 1).min(after.len())
        };
        out.extend(after[..end].chars().filter(|c| *c == '\n'));
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// `text` with comments removed and string and character literals emptied (`""`, `' '`), line breaks kept.
fn without_literals_and_comments(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let after_ident = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && at(i + 1) == '/') {
                if chars[i] == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else if c == 'r' && !after_ident && (at(i + 1) == '"' || (at(i + 1) == '#' && matches!(at(i + 2), '"' | '#')))
        {
            // A raw string: r"…", r#"…"#.
            let mut hashes = 0;
            i += 1;
            while at(i) == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1;
            while i < chars.len() {
                if chars[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                    i += 1 + hashes;
                    break;
                }
                if chars[i] == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            out.push_str("\"\"");
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                } else if chars[i] == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && (at(i + 1) == '\\' || at(i + 2) == '\'') {
            // A character literal ('x', '\n', '\u{..}'); a lifetime has no closing quote.
            i += 2;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// The paths a piece of code names after `crate::` and `super::`, resolved from module `here` (groups such as
/// `crate::{a::B, c}` give one path per item).
fn imported_paths(code: &str, here: &ModPath) -> Vec<ModPath> {
    let bytes = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts = bytes[i..].starts_with(b"crate::") || bytes[i..].starts_with(b"super::");
        if !starts || (i > 0 && (ident(bytes[i - 1]) || bytes[i - 1] == b':')) {
            i += 1;
            continue;
        }
        // The module the path is relative to: `crate` is the root, each `super` one level up from the module
        // this file is (a `mod.rs` file is its folder's module).
        let mut base: ModPath = Vec::new();
        if bytes[i..].starts_with(b"super::") {
            base = here.clone();
        }
        let mut j = i;
        loop {
            if bytes[j..].starts_with(b"crate::") {
                base.clear();
                j += "crate::".len();
            } else if bytes[j..].starts_with(b"super::") {
                base.pop();
                j += "super::".len();
            } else {
                break;
            }
        }
        let (paths, end) = path_tree(code, j);
        for p in paths {
            let mut full = base.clone();
            full.extend(p);
            out.push(full);
        }
        i = end.max(i + 1);
    }
    out
}

/// Parses `a::b::{c, d::e}` (or a single path) at `start`: every full path it names, and where it ends.
fn path_tree(code: &str, start: usize) -> (Vec<ModPath>, usize) {
    let bytes = code.as_bytes();
    let mut prefix: ModPath = Vec::new();
    let mut i = start;
    loop {
        let s = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        if i > s {
            prefix.push(code[s..i].to_string());
        }
        let group = if bytes[i..].starts_with(b"::{") {
            Some(3)
        } else if prefix.is_empty() && bytes[i..].starts_with(b"{") {
            Some(1)
        } else {
            None
        };
        if let Some(skip) = group {
            i += skip;
            let mut paths = Vec::new();
            loop {
                while i < bytes.len() && (bytes[i] == b' ' || bytes[i] == b'\n' || bytes[i] == b',') {
                    i += 1;
                }
                if i >= bytes.len() || bytes[i] == b'}' {
                    return (paths, i + 1);
                }
                let (inner, end) = path_tree(code, i);
                for p in inner {
                    let mut full = prefix.clone();
                    full.extend(p.into_iter().filter(|s| s != "self"));
                    paths.push(full);
                }
                // Skip an `as alias` and anything up to the next item.
                i = end;
                while i < bytes.len() && bytes[i] != b',' && bytes[i] != b'}' {
                    i += 1;
                }
            }
        }
        if bytes[i..].starts_with(b"::") {
            i += 2;
            continue;
        }
        return (vec![prefix], i);
    }
}

/// Each module's imports of other modules of the crate.
fn import_graph(src: &Path) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let mods = modules(src);
    let mut graph = BTreeMap::new();
    for (here, file) in &mods {
        let text = std::fs::read_to_string(file).expect("read source");
        let mut targets = BTreeSet::new();
        for path in imported_paths(&code_of(&text), here) {
            // The longest prefix that is a module of the crate is the one imported.
            let target = (0..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| mods.contains_key(p));
            if let Some(t) = target
                && &t != here
            {
                targets.insert(t);
            }
        }
        graph.insert(here.clone(), targets);
    }
    graph
}

/// Circles in the graph: each strongly connected set of two or more modules.
fn circles(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    // Two modules are in one circle when each reaches the other.
    let reach = |from: &ModPath| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(m) = stack.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&ModPath, BTreeSet<ModPath>> = graph.keys().map(|m| (m, reach(m))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for m in graph.keys() {
        if done.contains(m) || !reaches[m].contains(m) {
            continue;
        }
        let circle: Vec<ModPath> =
            graph.keys().filter(|o| reaches[m].contains(*o) && reaches[*o].contains(m)).cloned().collect();
        done.extend(circle.iter().cloned());
        out.push(circle);
    }
    out
}

fn show(m: &ModPath) -> String {
    if m.is_empty() { "crate root".into() } else { m.join("::") }
}

#[test]
fn modules_import_one_way() {
    let mut problems = Vec::new();
    for src in crate_sources() {
        let graph = import_graph(&src);
        for circle in circles(&graph) {
            let names: Vec<String> = circle.iter().map(show).collect();
            let edges: Vec<String> = circle
                .iter()
                .flat_map(|a| {
                    graph[a].iter().filter(|b| circle.contains(b)).map(move |b| format!("{} -> {}", show(a), show(b)))
                })
                .collect();
            problems.push(format!("{}: {} ({})", src.display(), names.join(", "), edges.join("; ")));
        }
    }
    assert!(problems.is_empty(), "import circles:\n{}", problems.join("\n"));
}

#[test]
fn source_files_stay_small() {
    let mut big = Vec::new();
    for src in crate_sources() {
        for file in modules(&src).values() {
            let text = std::fs::read_to_string(file).expect("read source");
            let lines = code_of(&text).lines().count();
            if lines > MAX_FILE_LINES {
                big.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(big.is_empty(), "split these along a seam (at most {MAX_FILE_LINES} lines each):\n{}", big.join("\n"));
}

/// The checker itself: it must see circles, group imports, `super::` and test modules the way they are.
#[test]
fn the_checker_sees_what_it_must() {
    let here: ModPath = vec!["a".into(), "b".into()];
    let code = code_of(concat!(
        "use crate::{x::Y, z, w::{self, V}};\nuse super::c::D; // crate::ignored\nfn f() { crate::q::r(); }\n",
        "#[cfg(test)]\nmod tests { let c = '}'; use crate::t; }\nlet s = \"crate::in_string\";\n",
        "/* crate::in_block */ let r = r#\"crate::raw\"#; fn g<'a>(x: &'a str) { crate::after::lifetime(); }",
    ));
    let paths: Vec<String> = imported_paths(&code, &here).iter().map(|p| p.join("::")).collect();
    assert!(paths.contains(&"x::Y".to_string()), "{paths:?}");
    assert!(paths.contains(&"z".to_string()), "{paths:?}");
    assert!(paths.contains(&"w::V".to_string()), "{paths:?}");
    assert!(paths.contains(&"a::c::D".to_string()), "{paths:?}");
    assert!(paths.contains(&"q::r".to_string()), "{paths:?}");
    assert!(paths.contains(&"after::lifetime".to_string()), "{paths:?}");
    for hidden in ["ignored", "in_string", "in_block", "raw"] {
        assert!(!paths.iter().any(|p| p.contains(hidden)), "{hidden}: {paths:?}");
    }
    assert!(!paths.contains(&"t".to_string()), "the test module's import counted: {paths:?}");
    let m = |s: &str| -> ModPath { s.split("::").filter(|x| !x.is_empty()).map(String::from).collect() };
    let graph: BTreeMap<ModPath, BTreeSet<ModPath>> =
        [(m("a"), [m("b")].into()), (m("b"), [m("c")].into()), (m("c"), [m("a")].into()), (m("d"), [m("a")].into())]
            .into();
    let found = circles(&graph);
    assert_eq!(found, vec![vec![m("a"), m("b"), m("c")]]);
}
