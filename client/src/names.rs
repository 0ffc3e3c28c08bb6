//! Validation of everything a user names: services, instance ids, methods.

use crate::error::{Error, Result};
use crate::model::{MAX_METHOD, MAX_NAME, MAX_RESOURCE_ID};

/// Checks a name: 1..=`max` bytes of UTF-8 with no control characters or whitespace.
/// `what` names the thing in the error ("service name", "instance id", …).
pub fn validate(what: &str, s: &str, max: usize) -> Result<()> {
    if s.is_empty() {
        return Err(Error::BadRequest(format!("{what} is empty")));
    }
    if s.len() > max {
        return Err(Error::BadRequest(format!(
            "{what} '{}…' is {} bytes, the maximum is {max}",
            s.chars().take(16).collect::<String>(),
            s.len()
        )));
    }
    // The usual name: printable ASCII only (a byte test per character, on every call).
    if s.bytes().all(|b| b.is_ascii_graphic()) {
        return Ok(());
    }
    if let Some((i, c)) = s
        .char_indices()
        .find(|(_, c)| c.is_control() || c.is_whitespace())
    {
        return Err(Error::BadRequest(format!(
            "{what} {s:?} contains {} at byte {i}",
            if c.is_control() {
                "a control character"
            } else {
                "whitespace"
            }
        )));
    }
    Ok(())
}

pub fn service(s: &str) -> Result<()> {
    validate("service name", s, MAX_NAME)
}

pub fn instance_id(s: &str) -> Result<()> {
    validate("instance id", s, MAX_NAME)
}

/// Resource ids: 1..=255 bytes of UTF-8 without control characters (spaces are allowed:
/// ids often come from user data such as document titles).
pub fn resource_id(s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(Error::BadRequest("resource id is empty".into()));
    }
    if s.len() > MAX_RESOURCE_ID {
        return Err(Error::BadRequest(format!(
            "resource id '{}…' is {} bytes, the maximum is {MAX_RESOURCE_ID}",
            s.chars().take(16).collect::<String>(),
            s.len()
        )));
    }
    if let Some(i) = s.find(|c: char| c.is_control()) {
        return Err(Error::BadRequest(format!(
            "resource id {s:?} contains a control character at byte {i}"
        )));
    }
    Ok(())
}

pub fn method(s: &str) -> Result<()> {
    validate("method name", s, MAX_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_long_control_and_space() {
        assert!(service("echo.v1").is_ok());
        for bad in ["", "a b", "tab\there", "nl\n", &"x".repeat(129)] {
            let e = service(bad).unwrap_err();
            assert!(matches!(e, Error::BadRequest(_)), "{bad:?}: {e}");
        }
        assert!(method(&"m".repeat(65))
            .unwrap_err()
            .to_string()
            .contains("maximum is 64"));
    }
}
