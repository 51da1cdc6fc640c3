//! The job token: every RPC carries it (`authorization: Bearer <token>`); a local launch
//! generates one. Compared in constant time.

/// A fresh random token (32 bytes from the OS, hex).
pub fn generate() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing authorization metadata (expected \"Bearer <job token>\")")]
    Missing,
    #[error("malformed authorization metadata (expected \"Bearer <job token>\")")]
    Malformed,
    #[error("wrong job token")]
    Wrong,
}

/// Checks an `authorization` header value against the job token.
pub fn check(header: Option<&str>, token: &str) -> Result<(), AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    let given = value.strip_prefix("Bearer ").ok_or(AuthError::Malformed)?;
    let (a, b) = (given.as_bytes(), token.as_bytes());
    let mut diff = (a.len() ^ b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    if diff == 0 && !token.is_empty() {
        Ok(())
    } else {
        Err(AuthError::Wrong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked() {
        let t = generate().expect("urandom");
        assert_eq!(t.len(), 64);
        assert_ne!(t, generate().expect("urandom"));
        assert_eq!(check(Some(&format!("Bearer {t}")), &t), Ok(()));
        assert_eq!(check(None, &t), Err(AuthError::Missing));
        assert_eq!(check(Some(&t), &t), Err(AuthError::Malformed));
        assert_eq!(check(Some("Bearer nope"), &t), Err(AuthError::Wrong));
        assert_eq!(
            check(Some(&format!("Bearer {t}x")), &t),
            Err(AuthError::Wrong)
        );
        assert_eq!(
            check(Some("Bearer "), ""),
            Err(AuthError::Wrong),
            "an empty token never matches"
        );
    }
}
