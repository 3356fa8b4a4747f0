//! Names of projects, blocks and accounts: short, URL- and path-safe.

/// Whether `name` is a valid project, block or account name: 1–64 characters of
/// lowercase ASCII letters, digits, `-` and `_`, starting with a letter or digit.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    name.len() <= 64
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// What a valid name looks like, for error messages.
pub const NAME_RULE: &str =
    "1-64 characters: lowercase letters, digits, '-' and '_', starting with a letter or digit";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects_names() {
        assert!(is_valid_name("hello"));
        assert!(is_valid_name("a1-b_2"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("-x"));
        assert!(!is_valid_name("Hello"));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name(&"a".repeat(65)));
    }
}
