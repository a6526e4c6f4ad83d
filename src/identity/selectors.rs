//! Selectors: what a workload must prove to receive its SVID, as `kind:name:value` text. A
//! registration lists the selectors its workload must show; an attestor observes selectors of
//! the caller; the registration whose selectors are all observed (the most specific one, if
//! several) names the identity.

use crate::error::{Error, Result};

/// The selectors a registration may hold at most.
pub const MAX_SELECTORS: usize = 8;

/// Whether a selector's value has the shape its kind requires.
type ValueCheck = fn(&str) -> bool;

/// The selectors the `unix` and `jwt` attestors observe, and what each value must look like.
const KNOWN: &[(&str, ValueCheck)] = &[
    ("unix:uid:", is_id),
    ("unix:gid:", is_id),
    ("unix:sha256:", is_sha256_hex),
    (JWT_ISSUER, is_claim_value),
    ("jwt:sub:", is_claim_value),
    ("jwt:claim:", is_named_claim_value),
];

/// The selector naming a `jwt` token's issuer. A registration with `jwt:` selectors names
/// exactly one, so that a subject or claim is never matched from another issuer's token.
const JWT_ISSUER: &str = "jwt:iss:";

fn is_claim_value(value: &str) -> bool {
    !value.is_empty() && value.len() <= 256 && !value.chars().any(char::is_control)
}

/// `<claim name>:<value>`.
fn is_named_claim_value(value: &str) -> bool {
    value.split_once(':').is_some_and(|(name, value)| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            && is_claim_value(value)
    })
}

fn is_id(value: &str) -> bool {
    !value.is_empty() && value.len() <= 10 && value.parse::<u32>().is_ok()
}

fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Validates a registration's selectors (`field` names the request field), sorted and without
/// repeats, so that two registrations with the same set compare equal.
pub fn parse(field: &str, selectors: &[String]) -> Result<Vec<String>> {
    if selectors.len() > MAX_SELECTORS {
        return Err(Error::invalid(
            field,
            format!("holds more than {MAX_SELECTORS} selectors"),
        ));
    }
    let mut parsed = Vec::with_capacity(selectors.len());
    for (index, selector) in selectors.iter().enumerate() {
        let valid = KNOWN
            .iter()
            .any(|(prefix, is_valid)| selector.strip_prefix(prefix).is_some_and(*is_valid));
        if !valid {
            return Err(Error::invalid(
                format!("{field}[{index}]"),
                format!(
                    "'{}' is not a known selector: unix:uid:<uid>, unix:gid:<gid>, \
                     unix:sha256:<64 lowercase hex digits of the executable's SHA-256>, \
                     jwt:iss:<issuer>, jwt:sub:<subject> or jwt:claim:<name>:<value>",
                    selector.chars().take(80).collect::<String>()
                ),
            ));
        }
        parsed.push(selector.clone());
    }
    let issuers = parsed.iter().filter(|s| s.starts_with(JWT_ISSUER)).count();
    if parsed.iter().any(|s| s.starts_with("jwt:")) && issuers != 1 {
        return Err(Error::invalid(
            field,
            "jwt: selectors need exactly one jwt:iss:<issuer>, so a subject or claim is \
             matched only from that issuer's tokens",
        ));
    }
    parsed.sort();
    parsed.dedup();
    Ok(parsed)
}

/// Whether every selector a registration requires was observed. A registration with no
/// selectors is never matched: it attests only with join tokens.
pub fn satisfied_by(required: &[String], observed: &[String]) -> bool {
    !required.is_empty() && required.iter().all(|selector| observed.contains(selector))
}

/// What the kernel says of a local peer: its uid, gid and, when its executable can be read,
/// the SHA-256 of that executable.
pub fn unix(uid: u32, gid: u32, pid: Option<i32>) -> Vec<String> {
    let mut observed = vec![format!("unix:uid:{uid}"), format!("unix:gid:{gid}")];
    if let Some(digest) = pid.and_then(executable_sha256) {
        observed.push(format!("unix:sha256:{digest}"));
    }
    observed
}

/// The SHA-256 (hex) of the executable of process `pid`, read through `/proc/<pid>/exe`.
fn executable_sha256(pid: i32) -> Option<String> {
    let mut file = std::fs::File::open(format!("/proc/{pid}/exe")).ok()?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = std::io::Read::read(&mut file, &mut buffer).ok()?;
        if read == 0 {
            break;
        }
        context.update(&buffer[..read]);
    }
    Some(crate::domain::ids::hex(context.finish().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_validated_sorted_and_deduplicated() {
        let given = [
            "unix:uid:1000".to_owned(),
            "unix:gid:10".to_owned(),
            "unix:uid:1000".to_owned(),
        ];
        assert_eq!(
            parse("selectors", &given).unwrap(),
            vec!["unix:gid:10".to_owned(), "unix:uid:1000".to_owned()]
        );
        for bad in [
            "unix:uid:-1",
            "unix:uid:",
            "unix:sha256:ABC",
            "k8s:ns:default",
            "unix:uid:99999999999",
        ] {
            let error = parse("selectors", &[bad.to_owned()]).unwrap_err();
            assert!(error.to_string().starts_with("selectors[0]:"), "{error}");
        }
    }

    #[test]
    fn a_registration_matches_only_when_all_its_selectors_are_observed() {
        let observed = unix(1000, 1000, None);
        assert!(satisfied_by(&["unix:uid:1000".into()], &observed));
        assert!(!satisfied_by(
            &["unix:uid:1000".into(), "unix:sha256:00".into()],
            &observed
        ));
        assert!(!satisfied_by(&[], &observed), "no selectors, no match");
    }

    #[test]
    fn the_own_executable_is_hashed() {
        let observed = unix(0, 0, Some(std::process::id() as i32));
        let digest = observed[2].strip_prefix("unix:sha256:").unwrap();
        assert!(is_sha256_hex(digest));
    }
}
