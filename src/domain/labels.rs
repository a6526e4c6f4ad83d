//! Labels: `key=value` facts an admin attaches to a registration entry (team, environment,
//! data class) for policy to read. They never decide identity, only what policy allows it.

use std::collections::BTreeMap;

use crate::error::Error;

/// The labels an entry may carry at most.
pub const MAX_LABELS: usize = 16;
const MAX_KEY_BYTES: usize = 63;
const MAX_VALUE_BYTES: usize = 256;

/// Validated labels, ordered by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// Validates labels given as a map (`field` names the request field): keys of 1 to 63
    /// bytes of lowercase letters, digits, `.`, `-`, `_` and `/`, starting with a letter or
    /// digit; values of at most 256 bytes without control characters.
    pub fn parse<'a>(
        field: &str,
        labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Self, Error> {
        let mut parsed = BTreeMap::new();
        for (key, value) in labels {
            let is_allowed =
                |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_./".contains(&b);
            let starts_well = key
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            if !starts_well || key.len() > MAX_KEY_BYTES || !key.bytes().all(is_allowed) {
                return Err(Error::invalid(
                    field,
                    format!(
                        "key '{}' must be 1 to {MAX_KEY_BYTES} bytes of lowercase letters, digits, \
                         '.', '-', '_' and '/', starting with a letter or digit",
                        key.chars().take(80).collect::<String>()
                    ),
                ));
            }
            if value.len() > MAX_VALUE_BYTES || value.chars().any(char::is_control) {
                return Err(Error::invalid(
                    format!("{field}[{key}]"),
                    format!("must be at most {MAX_VALUE_BYTES} bytes without control characters"),
                ));
            }
            parsed.insert(key.clone(), value.clone());
        }
        if parsed.len() > MAX_LABELS {
            return Err(Error::invalid(
                field,
                format!("holds more than {MAX_LABELS} labels"),
            ));
        }
        Ok(Labels(parsed))
    }

    /// Labels as the store keeps them (a JSON object), validated when written; `None` if the
    /// text is not such an object.
    pub fn from_stored_json(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok().map(Labels)
    }

    /// As a JSON object, the form the store and the audit trail keep.
    pub fn to_value(&self) -> serde_json::Value {
        self.0
            .iter()
            .map(|(key, value)| (key.clone(), serde_json::Value::from(value.as_str())))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    pub fn to_json(&self) -> String {
        self.to_value().to_string()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    /// Each label as `key=value`, the form policy reads.
    pub fn pairs(&self) -> impl Iterator<Item = String> + '_ {
        self.0.iter().map(|(key, value)| format!("{key}={value}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Labels, Error> {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Labels::parse("labels", owned.iter().map(|(k, v)| (k, v)))
    }

    #[test]
    fn labels_are_validated_and_round_trip_through_json() {
        let labels = parse(&[("team", "crm"), ("example.org/tier", "gold")]).unwrap();
        assert_eq!(Labels::from_stored_json(&labels.to_json()).unwrap(), labels);
        for bad in [
            &[("", "x")][..],
            &[("Team", "x")],
            &[("-team", "x")],
            &[("team", "line\nbreak")],
        ] {
            let error = parse(bad).unwrap_err();
            assert!(error.to_string().starts_with("labels"), "{error}");
        }
        let many: Vec<(String, String)> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert!(parse(&refs).is_err());
    }
}
