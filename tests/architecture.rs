//! The shape of `src/`: the top-level modules depend on each other without cycles, so that each
//! layer can be read, tested and changed from the bottom up; and no product file grows past
//! what one reading holds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines of product code (tests excluded) past which a file is split.
const MAX_PRODUCT_LINES: usize = 1_000;

/// Every product `.rs` file under `dir`: not a `tests.rs`, which is a test module of its own
/// (`#[cfg(test)] mod tests;`).
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("tests.rs") {
            found.push(path);
        }
    }
    found
}

/// A file without its unit tests (by convention its last item, a `#[cfg(test)] mod tests`).
fn without_tests(text: &str) -> &str {
    text.split("#[cfg(test)]\nmod tests").next().unwrap()
}

/// The identifier `text` starts with.
fn leading_ident(text: &str) -> String {
    text.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The modules a file's product code names as `crate::x`, directly or in a `use crate::{…}`
/// group; comments do not count.
fn named_modules(text: &str) -> BTreeSet<String> {
    let code: Vec<&str> = without_tests(text)
        .lines()
        .map(|line| line.split("//").next().unwrap())
        .collect();
    let code = code.join("\n");
    let mut named = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            named.insert(leading_ident(rest));
            continue;
        };
        // The group's entries at its own depth: `a::b`, `c::{d, e}`, `f`.
        let (mut depth, mut entry) = (0, String::new());
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    named.insert(leading_ident(&std::mem::take(&mut entry)));
                }
                c => entry.push(c),
            }
        }
        named.insert(leading_ident(&entry));
    }
    named
}

/// The crate's top-level modules (`src/x.rs` or `src/x/`), each with the others it names.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(src) {
        let top = file.strip_prefix(src).unwrap().iter().next().unwrap();
        let module = top.to_str().unwrap().trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let named = named_modules(&std::fs::read_to_string(&file).unwrap());
        graph.entry(module).or_default().extend(named);
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for (module, named) in &mut graph {
        named.retain(|other| other != module && modules.contains(other));
    }
    graph
}

/// A cycle through `start`, if there is one: the modules in order, `start` first.
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut path = vec![start.to_owned()];
    let mut seen = BTreeSet::new();
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        let here = path.last().unwrap().clone();
        for next in &graph[&here] {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    walk(graph, start, &mut path, &mut seen).then_some(path)
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_top_level_modules_import_each_other_without_cycles() {
    let graph = module_graph(&src());
    // The graph is read for real: the pipeline's module names those below it.
    assert!(graph["proxy"].contains("upstream"), "{graph:?}");
    assert!(graph["error"].contains("upstream"), "{graph:?}");
    for module in graph.keys() {
        if let Some(cycle) = cycle_through(&graph, module) {
            panic!("import cycle: {} -> {module}", cycle.join(" -> "));
        }
    }
}

#[test]
fn imports_are_read_from_paths_and_groups_but_not_comments() {
    let text =
        "use crate::a::X;\nuse crate::{b, c::{D, E}, f::G};\n// crate::h\nlet x = crate::i::j();\n\
                #[cfg(test)]\nmod tests { use crate::k; }";
    let expected = ["a", "b", "c", "f", "i"].map(String::from);
    assert_eq!(named_modules(text), BTreeSet::from(expected));
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> =
        [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]
            .into_iter()
            .map(|(from, to)| (from.to_owned(), BTreeSet::from([to.to_owned()])))
            .collect();
    assert_eq!(cycle_through(&graph, "a").unwrap(), ["a", "b", "c"]);
    assert_eq!(cycle_through(&graph, "d"), None);
}

#[test]
fn no_product_file_is_longer_than_one_reading() {
    let mut long = Vec::new();
    for file in sources(&src()) {
        let lines = without_tests(&std::fs::read_to_string(&file).unwrap())
            .lines()
            .count();
        if lines > MAX_PRODUCT_LINES {
            long.push(format!("{}: {lines}", file.display()));
        }
    }
    assert!(
        long.is_empty(),
        "over {MAX_PRODUCT_LINES} lines of product code: {long:?}"
    );
}
