//! The documentation held to the code and to itself: the README's two commands are the
//! ones CI runs, docs/configuration.md has a row for every key the configuration takes
//! and for no other, the example configuration shows every key, and every relative link of the README, ARCHITECTURE.md and docs/
//! leads to a file, and a heading, that exist. Nothing here needs root or a mount.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const README: &str = include_str!("../README.md");
const CI: &str = include_str!("../.ci/run");
const CONFIGURATION: &str = include_str!("../docs/configuration.md");
const EXAMPLE: &str = include_str!("../contrib/backupfs.toml.example");

/// The README's set-up block: the demo command, then the test command.
fn readme_commands() -> Vec<&'static str> {
    let setup = README
        .split("## Set-up")
        .nth(1)
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("the README's set-up block");
    setup
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .collect()
}

#[test]
fn the_readme_lands_with_the_demo_and_the_test_command_ci_runs() {
    assert_eq!(
        readme_commands(),
        ["cargo run --release -- demo", "./contrib/test.sh"],
        "the README's two commands"
    );
    let ci_commands: Vec<&str> = CI
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter(|line| !line.starts_with("set ") && !line.starts_with("cd "))
        .collect();
    assert_eq!(
        ci_commands,
        [readme_commands()[1]],
        ".ci/run runs the README's test command"
    );
}

#[test]
fn the_configuration_reference_has_a_row_for_every_key_and_no_other() {
    let documented: BTreeSet<String> = CONFIGURATION
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|line| line.split_once('`'))
        .map(|(key, _)| key.to_string())
        .filter(|key| key != "metric")
        .collect();
    let taken: BTreeSet<String> = backupfs::config::keys().into_iter().collect();
    let undocumented: Vec<&String> = taken.difference(&documented).collect();
    let unknown: Vec<&String> = documented.difference(&taken).collect();
    assert!(
        undocumented.is_empty(),
        "keys the code takes without a row in docs/configuration.md: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "rows of docs/configuration.md for keys the code does not take: {unknown:?}"
    );
}

#[test]
fn the_example_configuration_shows_every_key() {
    // Set, or commented out where it is optional: `key = ...` or `# key = ...`.
    let shown = |key: &str| {
        EXAMPLE.lines().any(|line| {
            let line = line.trim_start_matches('#').trim_start();
            line.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
    };
    let missing: Vec<String> = backupfs::config::keys()
        .into_iter()
        .filter(|key| !key.ends_with("<name>"))
        .filter(|key| !shown(key.rsplit('.').next().unwrap_or(key)))
        .collect();
    assert!(
        missing.is_empty(),
        "keys contrib/backupfs.toml.example does not show: {missing:?}"
    );
}

/// GitHub's anchor of a heading: lower case, letters, digits, `-` and `_` kept, spaces
/// made `-`, everything else dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut found = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            found.insert(anchor(line.trim_start_matches('#')));
        }
    }
    found
}

/// The relative links (`[text](target)`) of a markdown text, outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut in_code = false;
    let mut found = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        for piece in line.split("](").skip(1) {
            if let Some((target, _)) = piece.split_once(')')
                && !target.contains("://")
            {
                found.push(target.to_string());
            }
        }
    }
    found
}

#[test]
fn every_relative_link_of_the_docs_leads_to_a_file_and_heading_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<PathBuf> = vec![root.join("README.md"), root.join("ARCHITECTURE.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    assert!(docs.len() >= 6, "the manual's files in docs/: {docs:?}");
    files.extend(docs);
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read a doc");
        for link in links(&text) {
            let (path, fragment) = match link.split_once('#') {
                Some((path, fragment)) => (path, Some(fragment)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                file.clone()
            } else {
                file.parent().expect("a folder").join(path)
            };
            if !target.exists() {
                broken.push(format!("{}: {link}: no such file", file.display()));
                continue;
            }
            if let Some(fragment) = fragment {
                let text = std::fs::read_to_string(&target).expect("read a linked doc");
                if !anchors(&text).contains(fragment) {
                    broken.push(format!("{}: {link}: no such heading", file.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
