//! `health`: metald's `GET /health` and `grpc.health.v1` on the API port,
//! both of which need no token.

use crate::client::Api;
use crate::error::{CliError, one_line};
use crate::table::Table;

/// Prints both answers; fails unless both say metald serves.
pub async fn run(api: &Api) -> Result<String, CliError> {
    let (status, body) = api.http_health().await?;
    let grpc = api.grpc_health().await?;
    let parsed: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    let http_status = parsed
        .as_ref()
        .and_then(|v| v["status"].as_str())
        .unwrap_or("?")
        .to_owned();
    let version = parsed
        .as_ref()
        .and_then(|v| v["version"].as_str())
        .unwrap_or("")
        .to_owned();
    let mut t = Table::new(&["CHECK", "STATUS", "DETAIL"]);
    t.row(vec![
        "GET /health".into(),
        format!("{status} {http_status}"),
        if version.is_empty() {
            String::new()
        } else {
            format!("version {version}")
        },
    ]);
    t.row(vec!["grpc.health.v1".into(), grpc.clone(), String::new()]);
    if let Some(checks) = parsed.as_ref().and_then(|v| v["checks"].as_object()) {
        for (name, c) in checks {
            t.row(vec![
                name.clone(),
                c["status"].as_str().unwrap_or("?").to_owned(),
                c["detail"].as_str().unwrap_or("").to_owned(),
            ]);
        }
    }
    let out = t.render();
    if status != 200 || grpc != "SERVING" {
        print!("{out}");
        return Err(CliError::unavailable(format!(
            "metald is not serving: GET /health answered {status} {}, grpc.health.v1 {}",
            one_line(&http_status),
            one_line(&grpc)
        )));
    }
    Ok(out)
}
