//! metaldctl's one kind of failure: a Connect code and a message, printed
//! as exactly one line, `metaldctl: <code>: <message>`.

use std::fmt;

use connectrpc::ConnectError;

/// Exit status of a failed RPC or local operation.
pub const EXIT_FAILURE: i32 = 1;
/// Exit status of a command line that does not parse (as clap uses).
pub const EXIT_USAGE: i32 = 2;

/// A failure with the Connect code that names its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// Connect code name (`not_found`, `unavailable`, …) or `usage`.
    pub code: String,
    pub message: String,
}

impl CliError {
    pub fn new(code: &str, message: impl Into<String>) -> CliError {
        CliError {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// A mistake in what the user typed or gave in a file.
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError::new("usage", message)
    }

    pub fn unavailable(message: impl Into<String>) -> CliError {
        CliError::new("unavailable", message)
    }

    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        if self.code == "usage" {
            EXIT_USAGE
        } else {
            EXIT_FAILURE
        }
    }

    /// A Connect error from metald (or from reaching it). A transport
    /// failure's message is completed with its innermost cause, since
    /// "HTTP request failed" alone does not say why.
    pub fn from_connect(e: &ConnectError, addr: &str) -> CliError {
        let message = e.message.clone().unwrap_or_default();
        if e.code == connectrpc::ErrorCode::Unavailable
            && let Some(cause) = root_cause(e)
        {
            return CliError::unavailable(format!("cannot reach metald at {addr}: {cause}"));
        }
        CliError::new(e.code.as_str(), message)
    }
}

/// The innermost error in `e`'s source chain, if it has one.
fn root_cause(e: &ConnectError) -> Option<String> {
    let mut cur: &dyn std::error::Error = std::error::Error::source(e)?;
    while let Some(next) = cur.source() {
        cur = next;
    }
    Some(cur.to_string())
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "metaldctl: {}: {}",
            one_line(&self.code),
            one_line(&self.message)
        )
    }
}

/// `s` with every control character (newlines, terminal escapes) replaced,
/// so text from metald or a guest prints as one harmless line.
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_one_line_with_the_code() {
        let e = CliError::new("not_found", "vm \"x\" not found\n\x1b[2Jgotcha");
        assert_eq!(
            e.to_string(),
            "metaldctl: not_found: vm \"x\" not found  [2Jgotcha"
        );
        assert_eq!(e.exit_code(), EXIT_FAILURE);
        assert_eq!(CliError::usage("bad").exit_code(), EXIT_USAGE);
    }

    #[test]
    fn keeps_metald_codes() {
        let e = ConnectError::failed_precondition("cannot pause vm \"a\" in state created");
        let c = CliError::from_connect(&e, "http://x");
        assert_eq!(c.code, "failed_precondition");
        assert_eq!(c.message, "cannot pause vm \"a\" in state created");
    }
}
