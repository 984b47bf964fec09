//! Where metaldctl finds metald and its token: flags, then `METALD_*`
//! environment variables (clap merges those two), then the config file.

use std::path::{Path, PathBuf};

use crate::args::ConnArgs;
use crate::error::CliError;

/// metald's default API address (the wire contract's port 8080).
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:8080";

/// The settings a command connects with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Base URL with its scheme, no trailing slash.
    pub addr: String,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Client certificate and its key, for mTLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// What a config file may set; each key is optional.
#[derive(Debug, Default, PartialEq, Eq)]
struct FileSettings {
    addr: Option<String>,
    token: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

/// Resolves the settings: a value from a flag or the environment wins over
/// the file. An explicit `--config` must exist; the default file may not.
pub fn resolve(conn: &ConnArgs) -> Result<Settings, CliError> {
    let file = match &conn.config {
        Some(path) => read_file(path, true)?,
        None => match default_path() {
            Some(path) => read_file(&path, false)?,
            None => FileSettings::default(),
        },
    };
    let addr = conn
        .addr
        .clone()
        .or(file.addr)
        .unwrap_or_else(|| DEFAULT_ADDR.to_owned());
    let cert = conn.cert.clone().or(file.client_cert);
    let key = conn.key.clone().or(file.client_key);
    let client_cert = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err(CliError::usage("--cert and --key go together")),
    };
    Ok(Settings {
        addr: normalise_addr(&addr)?,
        token: conn.token.clone().or(file.token).filter(|t| !t.is_empty()),
        ca_file: conn.ca_file.clone().or(file.ca_file),
        client_cert,
    })
}

/// `$XDG_CONFIG_HOME/metald/metaldctl.toml`, else under `~/.config`.
fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("metald/metaldctl.toml"))
}

fn read_file(path: &Path, must_exist: bool) -> Result<FileSettings, CliError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
            return Ok(FileSettings::default());
        }
        Err(e) => return Err(CliError::usage(format!("config file: {e}"))),
    };
    parse_file(&text)
}

fn parse_file(text: &str) -> Result<FileSettings, CliError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| CliError::usage(format!("config file: {}", e.message())))?;
    let mut out = FileSettings::default();
    for (key, value) in table {
        let Some(s) = value.as_str().map(str::to_owned) else {
            return Err(CliError::usage(format!(
                "config file: {key} must be a string"
            )));
        };
        match key.as_str() {
            "addr" => out.addr = Some(s),
            "token" => out.token = Some(s),
            "ca_file" => out.ca_file = Some(PathBuf::from(s)),
            "client_cert" => out.client_cert = Some(PathBuf::from(s)),
            "client_key" => out.client_key = Some(PathBuf::from(s)),
            _ => {
                return Err(CliError::usage(format!(
                    "config file: unknown key {key:?} \
                     (known: addr, token, ca_file, client_cert, client_key)"
                )));
            }
        }
    }
    Ok(out)
}

/// `host:port` gets `http://`; only http and https are spoken.
fn normalise_addr(addr: &str) -> Result<String, CliError> {
    let addr = addr.trim();
    let full = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let uri: http::Uri = full
        .parse()
        .map_err(|_| CliError::usage(format!("--addr {addr:?} is not a URL")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(h)) if !h.is_empty() => {
            Ok(full.trim_end_matches('/').to_owned())
        }
        (Some("http" | "https"), _) => Err(CliError::usage(format!("--addr {addr:?} has no host"))),
        _ => Err(CliError::usage(format!(
            "--addr {addr:?}: only http:// and https:// are supported"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(addr: Option<&str>, token: Option<&str>, config: Option<PathBuf>) -> ConnArgs {
        ConnArgs {
            addr: addr.map(str::to_owned),
            token: token.map(str::to_owned),
            ca_file: None,
            cert: None,
            key: None,
            config,
        }
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "addr = \"http://file:1\"\ntoken = \"file-token\"\n").unwrap();
        let s = resolve(&conn(None, None, Some(path.clone()))).unwrap();
        assert_eq!(s.addr, "http://file:1");
        assert_eq!(s.token.as_deref(), Some("file-token"));
        let s = resolve(&conn(Some("flag:2"), Some("flag-token"), Some(path))).unwrap();
        assert_eq!(s.addr, "http://flag:2");
        assert_eq!(s.token.as_deref(), Some("flag-token"));
    }

    #[test]
    fn a_client_certificate_comes_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "client_cert = \"/c.pem\"\nclient_key = \"/c.key\"\n").unwrap();
        let s = resolve(&conn(Some("https://h:1"), None, Some(path))).unwrap();
        assert_eq!(s.client_cert, Some(("/c.pem".into(), "/c.key".into())));
        let mut half = conn(None, None, Some(dir.path().join("none.toml")));
        std::fs::write(dir.path().join("none.toml"), "").unwrap();
        half.cert = Some("/c.pem".into());
        assert_eq!(
            resolve(&half).unwrap_err().message,
            "--cert and --key go together"
        );
    }

    #[test]
    fn the_file_is_checked() {
        assert!(
            parse_file("adr = \"x\"")
                .unwrap_err()
                .message
                .contains("adr")
        );
        assert!(
            parse_file("token = 3")
                .unwrap_err()
                .message
                .contains("token")
        );
        assert!(parse_file("addr = ").is_err());
        let missing = conn(None, None, Some("/nonexistent/metaldctl.toml".into()));
        assert_eq!(resolve(&missing).unwrap_err().code, "usage");
    }

    #[test]
    fn addresses_are_urls() {
        assert_eq!(
            normalise_addr("127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(normalise_addr("https://h:1").unwrap(), "https://h:1");
        assert!(normalise_addr("ftp://h").is_err());
        assert!(normalise_addr("http://").is_err());
    }
}
