//! No import cycles among the files of any crate (issue #19).
//!
//! Builds, for every crate of the workspace (`crates/*/src` and the binary's
//! `src`), a graph with one node per source file and an edge A → B whenever A names
//! an item of B through a `crate::`, `super::` or `self::` path (in a `use` or
//! inline), then reports every strongly connected component larger than one file.
//!
//! What counts as an edge, deliberately:
//! - comments (doc links included) and `#[cfg(test)] mod … { … }` blocks are
//!   ignored, as are files under a `tests` module: tests may reach anywhere;
//! - a `pub use` re-export is the parent's facade, not a dependency: it is not an
//!   edge, and paths through it resolve to the module that defines the item (so
//!   `crate::KmsError` is an edge to `error.rs`);
//! - a module declaration (`mod x;`) is containment, not an edge.
//!
//! The scanner is a plain lexer over the text (no syntax tree): it understands
//! nested `use` groups (`use crate::{a::B, c::{D, E}}`) and nothing fancier. A
//! unit test below checks that it does find a planted cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path inside one crate, e.g. `["store", "sqlite"]`; the root is `[]`.
type ModPath = Vec<String>;

struct Crate {
    /// Module path → its source text, with comments and test blocks removed.
    files: BTreeMap<ModPath, String>,
    /// Module path → (re-exported name → full path it points to).
    reexports: BTreeMap<ModPath, BTreeMap<String, ModPath>>,
}

fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'"' {
            // Skip string literals so that "crate::x" in a message is not an edge.
            out.push('"');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            out.push('"');
            i += 1;
        } else {
            let ch = src[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Removes `#[cfg(test)]`-gated inline modules (`mod x { … }`, braces balanced).
fn strip_test_modules(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        let is_mod = trimmed.starts_with("mod ") || trimmed.starts_with("pub mod ");
        match (is_mod, after.find(['{', ';'])) {
            (true, Some(p)) if after.as_bytes()[p] == b'{' => {
                let mut depth = 0usize;
                let mut end = after.len();
                for (k, c) in after[p..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = p + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &after[end..];
            }
            _ => {
                out.push_str("#[cfg(test)]");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Parses the use-tree at the start of `s` (after a `::`), returning every path it
/// names (relative to the prefix), e.g. `{a::B, c::{D, E}}` → `a::B`, `c::D`, `c::E`.
fn parse_tree(s: &str) -> Vec<Vec<String>> {
    let s = s.trim_start();
    if let Some(inner) = s.strip_prefix('{') {
        let mut depth = 1usize;
        let mut items = Vec::new();
        let mut start = 0;
        for (k, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        items.push(&inner[start..k]);
                        break;
                    }
                }
                ',' if depth == 1 => {
                    items.push(&inner[start..k]);
                    start = k + 1;
                }
                _ => {}
            }
        }
        return items
            .into_iter()
            .filter(|i| !i.trim().is_empty())
            .flat_map(parse_tree)
            .collect();
    }
    let ident: String = s.chars().take_while(|&c| is_ident(c)).collect();
    if ident.is_empty() {
        return vec![Vec::new()];
    }
    let rest = &s[ident.len()..];
    if let Some(next) = rest.strip_prefix("::") {
        parse_tree(next)
            .into_iter()
            .map(|mut p| {
                p.insert(0, ident.clone());
                p
            })
            .collect()
    } else {
        vec![vec![ident]]
    }
}

/// Every path the text names after `crate::`, `super::` or `self::`, made absolute
/// from module `me` (whose file is a `mod.rs`/`lib.rs` when `is_dir`).
fn referenced_paths(text: &str, me: &ModPath) -> Vec<ModPath> {
    let mut out = Vec::new();
    for kw in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(at) = text[from..].find(kw) {
            let pos = from + at;
            from = pos + kw.len();
            // Must be a path start, not the tail of another identifier (`$crate::`).
            if text[..pos]
                .chars()
                .next_back()
                .is_some_and(|c| is_ident(c) || c == '$')
            {
                continue;
            }
            let base: ModPath = match kw {
                "crate::" => Vec::new(),
                "self::" => me.clone(),
                _ => {
                    // Count consecutive `super::` segments.
                    let mut base = me.clone();
                    base.pop();
                    let mut tail = &text[from..];
                    while let Some(t) = tail.strip_prefix("super::") {
                        base.pop();
                        tail = t;
                        from += "super::".len();
                    }
                    base
                }
            };
            for p in parse_tree(&text[from..]) {
                let mut full = base.clone();
                full.extend(p.into_iter().filter(|s| s != "self"));
                out.push(full);
            }
        }
    }
    out
}

/// The source text minus its `pub use` statements (they are facades, not edges).
fn without_reexports(text: &str) -> (String, Vec<String>) {
    let mut kept = String::with_capacity(text.len());
    let mut reexports = Vec::new();
    let mut rest = text;
    loop {
        let next = ["pub use ", "pub(crate) use "]
            .iter()
            .filter_map(|k| rest.find(k).map(|p| (p, k.len())))
            .min();
        let Some((p, klen)) = next else { break };
        kept.push_str(&rest[..p]);
        let body = &rest[p + klen..];
        let end = body.find(';').unwrap_or(body.len());
        reexports.push(body[..end].to_string());
        rest = &body[(end + 1).min(body.len())..];
    }
    kept.push_str(rest);
    (kept, reexports)
}

fn load_crate(src_dir: &Path) -> Crate {
    let mut files = BTreeMap::new();
    let mut reexports = BTreeMap::new();
    let mut stack = vec![src_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read source dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "tests" && n != "bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src_dir).expect("under src");
            let mut m: ModPath = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let file = m.pop().expect("file name");
            match file.as_str() {
                "lib.rs" | "main.rs" if m.is_empty() => {}
                "mod.rs" => {}
                "tests.rs" => continue,
                f => m.push(f.trim_end_matches(".rs").to_string()),
            }
            let raw = std::fs::read_to_string(&path).expect("read source");
            let text = strip_test_modules(&strip_comments(&raw));
            let (kept, reex) = without_reexports(&text);
            let mut map = BTreeMap::new();
            for r in reex {
                // Relative re-exports (`pub use sqlite::X`) are relative to this module.
                let r = r.trim();
                let paths = if r.starts_with("crate::")
                    || r.starts_with("super::")
                    || r.starts_with("self::")
                {
                    referenced_paths(r, &m)
                } else {
                    parse_tree(r)
                        .into_iter()
                        .map(|p| m.iter().cloned().chain(p).collect())
                        .collect()
                };
                for p in paths {
                    if let Some(name) = p.last() {
                        map.insert(name.clone(), p.clone());
                    }
                }
            }
            reexports.insert(m.clone(), map);
            files.insert(m, kept);
        }
    }
    Crate { files, reexports }
}

/// The file that defines what `path` names: the longest module prefix, following
/// re-exports of that module (a bounded number of times).
fn resolve(c: &Crate, path: &ModPath) -> Option<ModPath> {
    let mut path = path.clone();
    for _ in 0..8 {
        let mut k = path.len();
        while k > 0 && !c.files.contains_key(&path[..k]) {
            k -= 1;
        }
        let module: ModPath = path[..k].to_vec();
        let Some(name) = path.get(k) else {
            return Some(module);
        };
        match c.reexports.get(&module).and_then(|m| m.get(name)) {
            Some(target) if target != &path[..=k] => {
                let mut next = target.clone();
                next.extend(path[k + 1..].iter().cloned());
                path = next;
            }
            _ => return Some(module),
        }
    }
    None
}

fn graph(c: &Crate) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let mut g = BTreeMap::new();
    for (m, text) in &c.files {
        let mut deps = BTreeSet::new();
        for p in referenced_paths(text, m) {
            if let Some(target) = resolve(c, &p) {
                // Edges to the crate root are to its facade only; a module naming
                // an ancestor it is declared in (not an item of it) is no edge.
                if &target != m && !target.is_empty() {
                    deps.insert(target);
                }
            }
        }
        g.insert(m.clone(), deps);
    }
    g
}

/// Strongly connected components with more than one node (Tarjan).
fn cycles(g: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    struct T<'a> {
        g: &'a BTreeMap<ModPath, BTreeSet<ModPath>>,
        index: BTreeMap<&'a ModPath, usize>,
        low: BTreeMap<&'a ModPath, usize>,
        on: BTreeSet<&'a ModPath>,
        stack: Vec<&'a ModPath>,
        next: usize,
        out: Vec<Vec<ModPath>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a ModPath) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let Some((w, _)) = t.g.get_key_value(w) else {
                continue;
            };
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        on: BTreeSet::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn show(c: &[ModPath]) -> String {
    c.iter()
        .map(|m| {
            if m.is_empty() {
                "lib".into()
            } else {
                m.join("/")
            }
        })
        .collect::<Vec<_>>()
        .join(" ↔ ")
}

fn source_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec![root.join("src")];
    for e in std::fs::read_dir(root.join("crates")).expect("crates dir") {
        let d = e.expect("entry").path().join("src");
        if d.is_dir() {
            dirs.push(d);
        }
    }
    dirs.sort();
    dirs
}

#[test]
fn no_file_of_any_crate_imports_itself_through_a_cycle() {
    let mut found = Vec::new();
    for dir in source_dirs() {
        let c = load_crate(&dir);
        assert!(
            c.files.len() > 1 || dir.ends_with("src"),
            "{} has sources",
            dir.display()
        );
        for cyc in cycles(&graph(&c)) {
            found.push(format!("{}: {}", dir.display(), show(&cyc)));
        }
    }
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn the_scanner_finds_a_planted_cycle_and_ignores_facades_and_tests() {
    let dir = std::env::temp_dir().join(format!("qkdnet-cycles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("store")).expect("mkdir");
    let w = |p: &str, s: &str| std::fs::write(dir.join(p), s).expect("write");
    w(
        "lib.rs",
        "pub mod a;\npub mod b;\npub mod store;\npub use a::Alpha;\n",
    );
    // a → b via the root re-export of b's item? No: a names crate::b::Beta.
    w("a.rs", "use crate::b::Beta;\npub struct Alpha;\n");
    // b → a through the crate-root facade (resolves to a.rs), inside a nested group.
    w(
        "b.rs",
        "use crate::{Alpha as _A, store::{Unit}};\npub struct Beta;\n",
    );
    // store/mod.rs re-exports its child; the child names the parent: no cycle.
    w(
        "store/mod.rs",
        "pub mod unit;\npub use unit::Unit;\npub struct Err;\n",
    );
    w(
        "store/unit.rs",
        "use super::Err;\n// crate::a::Alpha in a comment\npub struct Unit;\n#[cfg(test)]\nmod tests { use crate::b::Beta; }\n",
    );
    let c = load_crate(&dir);
    let g = graph(&c);
    let found = cycles(&g);
    std::fs::remove_dir_all(&dir).expect("cleanup");
    assert_eq!(found.len(), 1, "{found:?} in {g:?}");
    assert_eq!(show(&found[0]), "a ↔ b");
    let unit: ModPath = vec!["store".into(), "unit".into()];
    assert_eq!(g[&unit], BTreeSet::from([vec!["store".to_string()]]));
}
