//! Printing command results: readable text, JSON (`--json`), or one field (`--field`), so that
//! scripts can capture a value: `TASK=$(warrant task begin ... --field task_id)`.

use serde_json::Value;

use super::CommandError;

pub struct Format {
    json: bool,
    field: Option<String>,
}

impl Format {
    pub fn new(json: bool, field: Option<String>) -> Self {
        Format { json, field }
    }

    /// Prints `value` as the chosen format; `text` renders it for people.
    pub fn print(
        &self,
        value: &Value,
        text: impl FnOnce(&Value) -> String,
    ) -> Result<(), CommandError> {
        if let Some(path) = &self.field {
            let selected = path
                .split('.')
                .try_fold(value, |current, segment| match current {
                    Value::Array(items) => segment
                        .parse::<usize>()
                        .ok()
                        .and_then(|index| items.get(index)),
                    other => other.get(segment),
                })
                .ok_or_else(|| {
                    CommandError::Usage(format!("--field {path}: no such field in the result"))
                })?;
            match selected {
                Value::String(text) => emit(&format!("{text}\n")),
                other => emit(&format!("{other}\n")),
            };
        } else if self.json {
            emit(&format!(
                "{}\n",
                serde_json::to_string_pretty(value).unwrap_or_default()
            ));
        } else {
            emit(&text(value));
        }
        Ok(())
    }
}

/// Writes `text` to standard output. Returns `false` once the reader has gone away (as with
/// `| head`), so the caller can stop instead of failing.
pub fn emit(text: &str) -> bool {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_ok()
}

/// RFC 3339 text for a protobuf timestamp.
pub fn time(at: Option<&prost_types::Timestamp>) -> String {
    at.and_then(|at| {
        let seconds = u64::try_from(at.seconds).ok()?;
        Some(
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds),
            )
            .to_string(),
        )
    })
    .unwrap_or_default()
}

/// A string member of a JSON value, or "" when absent.
pub fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or_default()
}
