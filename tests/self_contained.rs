//! The repository stands on its own: no file in it refers to a path outside it, so a clone with
//! nothing beside it builds and passes its tests.

use std::path::{Component, Path, PathBuf};

mod util;

/// Folders that are not part of the tree: build outputs, fetched weights and tokenizers, runs.
const SKIPPED: &[&str] = &[
    ".git",
    "target",
    "out",
    "runs",
    "data/models",
    "data/tokenizers",
];

fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = path.strip_prefix(root).unwrap();
        if SKIPPED.iter().any(|s| rel == Path::new(s)) || rel.ends_with("__pycache__") {
            continue;
        }
        if path.is_dir() {
            files(root, &path, out);
        } else {
            out.push(path);
        }
    }
}

/// `base/rel` with `.` and `..` resolved lexically; `None` when it climbs above `root`.
fn resolve_within(root: &Path, base: &Path, rel: &str) -> Option<PathBuf> {
    let mut parts: Vec<Component> = base.strip_prefix(root).unwrap().components().collect();
    for c in Path::new(rel).components() {
        match c {
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir => {}
            other => parts.push(other),
        }
    }
    Some(parts.iter().collect())
}

/// Every relative path in `text` that starts by climbing (`../`), up to the first character
/// that cannot be part of a path.
fn climbing_paths(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("../") {
        let start = i + at;
        let starts_token = start == 0
            || !matches!(bytes[start - 1], b'.' | b'/' | b'_' | b'-')
                && !bytes[start - 1].is_ascii_alphanumeric();
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || "./_-".contains(c)))
            .map_or(text.len(), |n| start + n);
        if starts_token {
            found.push(&text[start..end]);
        }
        i = end.max(start + 3);
    }
    found
}

#[test]
fn no_file_refers_to_a_path_outside_the_repository() {
    let root = util::root();
    let mut all = Vec::new();
    files(&root, &root, &mut all);
    assert!(all.len() > 50, "walked only {} files", all.len());
    // Spelled in pieces so that this file does not match itself.
    let forbidden = [format!("..{}shared", '/'), format!("{}work{}", '/', '/')];
    let mut bad = Vec::new();
    for path in &all {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue; // binary files (fixtures, plots)
        };
        let rel = path.strip_prefix(&root).unwrap().display().to_string();
        for word in &forbidden {
            if text.contains(word.as_str()) {
                bad.push(format!("{rel}: names {word}"));
            }
        }
        for p in climbing_paths(&text) {
            if resolve_within(&root, path.parent().unwrap(), p).is_none() {
                bad.push(format!("{rel}: {p} climbs out of the repository"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "references outside the tree:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_checker_sees_a_climb_out_and_allows_one_within() {
    let root = Path::new("/r");
    let base = Path::new("/r/crates/a/tests");
    // Built from pieces so that this file's own text climbs nowhere.
    let up = |n: usize| format!("{}x", "../".repeat(n));
    let quoted = format!("join(\"{}\")", up(2));
    assert_eq!(climbing_paths(&quoted), [up(2).as_str()]);
    assert_eq!(climbing_paths("a/../b and ./c"), Vec::<&str>::new());
    assert!(resolve_within(root, base, &up(3)).is_some());
    assert!(resolve_within(root, base, &up(4)).is_none());
}
