//! The layers: the raw text of each key and where it came from (default < file < environment),
//! and reading it back typed, with errors that name the key as the operator wrote it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use super::keys::{Key, Row, CREDENTIALS_SECRET, CREDENTIALS_SECRET_FILE, ONE_SOURCE};
use super::parse::Toml;
use super::{ConfigError, Origin};

/// A value as written, before parsing.
struct Raw {
    text: String,
    origin: Origin,
}

/// The winning raw value of each key that is set in the file or the environment.
#[derive(Default)]
pub(super) struct Layers {
    /// By file key.
    values: HashMap<&'static str, Raw>,
}

static DEFAULT: Origin = Origin::Default;

impl Layers {
    pub(super) fn read_file(&mut self, path: &Path, source: &str) -> Result<(), ConfigError> {
        let doc = DeTable::parse(source).map_err(|e| {
            // toml's own Display spans several lines (it quotes the source); keep ours to one.
            let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
            ConfigError::new(at_line(path, source, e.span().map(|s| s.start)), message)
        })?;
        self.read_table(path, source, "", doc.get_ref())
    }

    fn read_table(
        &mut self,
        path: &Path,
        source: &str,
        prefix: &str,
        table: &DeTable<'_>,
    ) -> Result<(), ConfigError> {
        let mut entries = table.iter().collect::<Vec<_>>();
        // Report the first problem in the file, not the first in key order.
        entries.sort_by_key(|(name, _)| name.span().start);
        for (name, value) in entries {
            let dotted = format!("{prefix}{}", name.get_ref());
            // A quoted key containing a dot (`"upstream.url" = ..`) is not `upstream.url`.
            let key = Key::ALL
                .iter()
                .find(|k| k.name == dotted && !name.get_ref().contains('.'));
            let is_table = Key::ALL
                .iter()
                .any(|k| k.name.starts_with(&format!("{dotted}.")));
            let origin = Origin::File(path.to_owned());
            match (key, value.get_ref()) {
                (Some(key), value) => {
                    let text = from_toml(key, value)
                        .map_err(|problem| ConfigError::new(key.describe(&origin), problem))?;
                    self.values.insert(key.name, Raw { text, origin });
                }
                (None, DeValue::Table(table)) if is_table => {
                    self.read_table(path, source, &format!("{dotted}."), table)?
                }
                (None, value) if is_table => {
                    let problem =
                        format!("expected a table, got {}", with_article(value.type_str()));
                    return Err(ConfigError::new(
                        format!("{dotted} in {}", path.display()),
                        problem,
                    ));
                }
                (None, _) => {
                    let known = Key::ALL
                        .iter()
                        .filter(|k| k.toml != Toml::Forbidden)
                        .map(|k| k.name);
                    let problem = match closest(&dotted, known.clone()) {
                        Some(name) => format!("unknown key {dotted:?} (did you mean {name}?)"),
                        None => format!(
                            "unknown key {dotted:?} (expected one of: {})",
                            known.collect::<Vec<_>>().join(", ")
                        ),
                    };
                    return Err(ConfigError::new(
                        at_line(path, source, Some(name.span().start)),
                        problem,
                    ));
                }
            }
        }
        Ok(())
    }

    pub(super) fn read_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        for key in Key::ALL {
            let names = std::iter::once(key.env).chain(key.fallback_env.iter().copied());
            if let Some((name, text)) = names
                .filter_map(|name| env.get(name).map(|text| (name, text)))
                .next()
            {
                let origin = Origin::Env(name);
                self.values.insert(
                    key.name,
                    Raw {
                        text: text.clone(),
                        origin,
                    },
                );
            }
        }
        // An environment variable for the key id or the secret replaces the file's choice.
        ONE_SOURCE
            .into_iter()
            .try_for_each(|(inline, file)| self.one_source(inline, file))
    }

    /// Leaves at most one of `inline` and `file` set: the environment's, if it set one.
    fn one_source(&mut self, inline: &Key, file: &Key) -> Result<(), ConfigError> {
        let from_env = |layers: &Self, key: &Key| {
            matches!(
                layers.values.get(key.name).map(|raw| &raw.origin),
                Some(Origin::Env(_))
            )
        };
        let (inline_set, file_set) = (
            self.values.contains_key(inline.name),
            self.values.contains_key(file.name),
        );
        if !(inline_set && file_set) {
            return Ok(());
        }
        match (from_env(self, inline), from_env(self, file)) {
            (true, true) => Err(ConfigError::new(
                format!("{} and {} (environment)", inline.env, file.env),
                "both are set; set only one of them",
            )),
            (true, false) => {
                self.values.remove(file.name);
                Ok(())
            }
            (false, true) => {
                self.values.remove(inline.name);
                Ok(())
            }
            (false, false) => Err(self.error(
                file,
                format!("{} is set too; set only one of them", inline.name),
            )),
        }
    }

    /// The winning text and origin of `key`, falling back to its default.
    pub(super) fn get(&self, key: &Key) -> Option<(&str, &Origin)> {
        match self.values.get(key.name) {
            Some(raw) => Some((&raw.text, &raw.origin)),
            None => key.default.map(|text| (text, &DEFAULT)),
        }
    }

    pub(super) fn origin(&self, key: &Key) -> &Origin {
        self.get(key).map_or(&DEFAULT, |(_, origin)| origin)
    }

    /// An error about `key`, named as the operator wrote it.
    pub(super) fn error(&self, key: &Key, problem: impl Into<String>) -> ConfigError {
        ConfigError::new(key.describe(self.origin(key)), problem)
    }

    /// The parsed value of `row`, or its default; `None` if it has neither.
    pub(super) fn optional<T>(&self, row: &Row<T>) -> Result<Option<T>, ConfigError> {
        self.get(row)
            .map(|(text, origin)| {
                (row.parse)(text).map_err(|problem| ConfigError::new(row.describe(origin), problem))
            })
            .transpose()
    }

    pub(super) fn value<T>(&self, row: &Row<T>) -> Result<T, ConfigError> {
        self.optional(row)?.ok_or_else(|| {
            let problem = format!(
                "required: set {} or {} in the config file",
                row.env, row.name
            );
            ConfigError::new(row.name, problem)
        })
    }

    /// A path key. A relative path from the config file is relative to the file's directory, so
    /// that a file and what it names can move together; one from the environment stays
    /// relative to the working directory, as a shell would read it.
    pub(super) fn path(&self, row: &Row<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
        let path = self.optional(row)?;
        Ok(match (path, self.origin(row)) {
            (Some(path), Origin::File(file)) if path.is_relative() => {
                Some(file.parent().unwrap_or(Path::new("")).join(path))
            }
            (path, _) => path,
        })
    }
}

/// The candidate nearest to `name` by edit distance, if near enough to be a typo of it: at most
/// one edit per six characters, so that `upstream.urll` finds `upstream.url` but
/// `upstream.foo` finds nothing.
pub(super) fn closest<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .map(|candidate| (edit_distance(name, candidate), candidate))
        .filter(|&(distance, candidate)| distance <= (candidate.len() / 6).max(1))
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance over bytes (names are ASCII): insertions, deletions, substitutions.
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let mut previous = (0..=b.len()).collect::<Vec<_>>();
    for (i, x) in a.bytes().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, y) in b.bytes().enumerate() {
            let substitution = previous[j] + usize::from(x != y);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// `/etc/x.toml line 4`, from a byte offset into the file.
fn at_line(path: &Path, source: &str, offset: Option<usize>) -> String {
    match offset {
        Some(offset) => {
            let before = &source.as_bytes()[..offset.min(source.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            format!("{} line {line}", path.display())
        }
        None => path.display().to_string(),
    }
}

/// The file's value as text for the key's parser, after checking its TOML type.
fn from_toml(key: &Key, value: &DeValue<'_>) -> Result<String, String> {
    match (key.toml, value) {
        (Toml::Str(_), DeValue::String(text)) => Ok(text.to_string()),
        (Toml::Bool, DeValue::Boolean(b)) => Ok(b.to_string()),
        (Toml::Str(what), other) => Err(format!(
            "expected {what} as a quoted string, got {}",
            with_article(other.type_str())
        )),
        (Toml::Bool, other) => Err(format!(
            "expected true or false (unquoted), got {}",
            with_article(other.type_str())
        )),
        (Toml::Forbidden, _) => Err(format!(
            "the secret is not accepted in the config file (often a ConfigMap); use {} or set {} \
             (preferred) or {}",
            CREDENTIALS_SECRET_FILE.name, CREDENTIALS_SECRET_FILE.env, CREDENTIALS_SECRET.env,
        )),
    }
}

/// `an integer`, `a string`.
fn with_article(noun: &str) -> String {
    match noun.as_bytes().first() {
        Some(b'a' | b'e' | b'i' | b'o' | b'u') => format!("an {noun}"),
        _ => format!("a {noun}"),
    }
}
