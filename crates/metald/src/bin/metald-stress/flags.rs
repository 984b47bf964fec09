//! Command-line flags. The seeds' tool was written in Go, whose flags are
//! single-dash long names (`-max-vms 3`); metald-stress accepts those as
//! written and the usual double-dash spelling too.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser};

/// Drives a metald with a changing fleet of VMs and reports per-RPC
/// latency percentiles and errors by Connect code.
#[derive(Debug, Clone, Parser)]
#[command(name = "metald-stress", version, about, long_about = None)]
pub struct Flags {
    /// metald's API address (`http://host:port`; `host:port` means plain HTTP).
    #[arg(long, global = true, default_value = "http://localhost:8080")]
    pub server: String,

    /// How many intervals to run; each draws a new VM target.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub intervals: u32,

    /// How long each interval lasts.
    #[arg(long, default_value = "2m", value_parser = positive_duration)]
    pub interval_duration: Duration,

    /// How often, within an interval, the fleet is moved toward the target
    /// and read back (an iteration that takes longer starts the next at once).
    #[arg(long, default_value = "5s", value_parser = positive_duration)]
    pub iteration_duration: Duration,

    /// The largest VM target an interval may draw.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_vms: u32,

    /// Heavier traffic: targets drawn from the upper half, more concurrent
    /// calls, every VM read each iteration, pause/resume and reboot churn,
    /// graceful shutdowns.
    #[arg(long)]
    pub heavy_load: bool,

    /// The customers VMs are spread over: a count N (dev tokens
    /// `dev_customer_stress<1..N>`, needs metald's `--auth-mode dev`) or a
    /// comma-separated list of bearer tokens.
    #[arg(long, global = true, default_value = "3")]
    pub auth: String,

    /// The test guest: an `assets.env` as `scripts/guest-assets.sh` writes it
    /// (default: `.metald/assets/assets.env` under the current directory, if
    /// there, as in a checkout whose tests ran).
    #[arg(long, env = "METALD_ASSETS_ENV")]
    pub backend_assets: Option<PathBuf>,

    /// Guest kernel (instead of, or overriding, `--backend-assets`).
    #[arg(long)]
    pub kernel: Option<String>,

    /// Guest initrd (instead of, or overriding, `--backend-assets`).
    #[arg(long)]
    pub initrd: Option<String>,

    /// Guest root disk, attached read-only (instead of, or overriding,
    /// `--backend-assets`).
    #[arg(long)]
    pub disk: Option<String>,

    /// Guest kernel command line.
    #[arg(long)]
    pub kernel_args: Option<String>,

    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(16..=65536))]
    pub memory_mib: u64,

    /// Most RPCs in flight at once (default 4, or 16 with `-heavy-load`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: Option<u32>,

    /// Deadline of each RPC.
    #[arg(long, default_value = "2m", value_parser = positive_duration)]
    pub rpc_timeout: Duration,

    /// Seed of the random choices (default: drawn at start and printed).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write `report.json`, `latency.svg` (latency over time) and
    /// `histograms.svg` (per-RPC latency distribution) into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,

    /// Print the settings as JSON and exit without calling metald.
    #[arg(long)]
    pub dry_run: bool,

    #[command(subcommand)]
    pub command: Option<Sub>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Sub {
    /// Benchmarks of metald (one result line each).
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Bench {
    /// GetVmInfo and ListVms throughput over HTTP/1.1 and h2c.
    Api(crate::bench::ApiBench),
}

impl Flags {
    /// Parses `args` (program name first), accepting Go-style single-dash
    /// long flags.
    pub fn parse_from_args<I>(args: I) -> Result<Flags, clap::Error>
    where
        I: IntoIterator<Item = OsString>,
    {
        Flags::try_parse_from(normalise(args))
    }

    /// Most RPCs in flight at once.
    pub fn concurrency(&self) -> usize {
        let default = if self.heavy_load { 16 } else { 4 };
        self.concurrency.unwrap_or(default) as usize
    }

    /// The bearer tokens VMs are spread over.
    pub fn tokens(&self) -> Result<Vec<String>, String> {
        let raw = self.auth.trim();
        if let Ok(n) = raw.parse::<u32>() {
            if n == 0 || n > 1000 {
                return Err(format!("-auth: a count must be 1..=1000, got {n}"));
            }
            return Ok((1..=n).map(|i| format!("dev_customer_stress{i}")).collect());
        }
        let tokens: Vec<String> = raw
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        if tokens.is_empty() {
            return Err("-auth: expected a count or comma-separated tokens".into());
        }
        if tokens
            .iter()
            .any(|t| !t.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err("-auth: tokens must be printable ASCII without spaces".into());
        }
        Ok(tokens)
    }

    /// The server URL with a scheme.
    pub fn server_url(&self) -> String {
        let s = self.server.trim().trim_end_matches('/');
        if s.contains("://") {
            s.to_owned()
        } else {
            format!("http://{s}")
        }
    }
}

/// Rewrites `-name` to `--name` for every long flag metald-stress knows
/// (also `-name=value`), leaving short flags, values and anything after
/// `--` alone.
pub fn normalise<I>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = OsString>,
{
    let mut longs = vec!["help".to_owned(), "version".to_owned()];
    long_names(&Flags::command(), &mut longs);
    let mut out = Vec::new();
    let mut rest = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || rest {
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            rest = true;
            out.push(arg);
            continue;
        }
        let single = s.strip_prefix('-').filter(|t| !t.starts_with('-'));
        let name = single.map(|t| t.split_once('=').map_or(t, |(n, _)| n));
        match name {
            Some(n) if longs.iter().any(|l| l == n) => out.push(format!("-{s}").into()),
            _ => out.push(arg),
        }
    }
    out
}

/// The long flag names of `cmd` and its subcommands.
fn long_names(cmd: &clap::Command, out: &mut Vec<String>) {
    out.extend(
        cmd.get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned)),
    );
    for sub in cmd.get_subcommands() {
        long_names(sub, out);
    }
}

pub fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 20s, 2m, 500ms)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Flags {
        let mut v: Vec<OsString> = vec!["metald-stress".into()];
        v.extend(args.iter().map(OsString::from));
        Flags::parse_from_args(v).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn single_and_double_dash_spellings_parse_alike() {
        let go = parse(&[
            "-intervals",
            "1",
            "-interval-duration",
            "20s",
            "-max-vms",
            "3",
            "-heavy-load",
            "-server=127.0.0.1:9",
            "-auth",
            "2",
        ]);
        let gnu = parse(&[
            "--intervals",
            "1",
            "--interval-duration=20s",
            "--max-vms",
            "3",
            "--heavy-load",
            "--server",
            "127.0.0.1:9",
            "--auth=2",
        ]);
        for f in [&go, &gnu] {
            assert_eq!(f.intervals, 1);
            assert_eq!(f.interval_duration, Duration::from_secs(20));
            assert_eq!(f.max_vms, 3);
            assert!(f.heavy_load);
            assert_eq!(f.server_url(), "http://127.0.0.1:9");
            assert_eq!(f.tokens().unwrap().len(), 2);
        }
    }

    #[test]
    fn unknown_single_dash_words_and_values_are_left_alone() {
        let args: Vec<OsString> = ["x", "-nope", "-auth", "-1", "--", "-max-vms"]
            .into_iter()
            .map(OsString::from)
            .collect();
        let out = normalise(args);
        assert_eq!(out, ["x", "-nope", "--auth", "-1", "--", "-max-vms"]);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let v: Vec<OsString> = ["metald-stress", "-max-vms", "0"]
            .into_iter()
            .map(OsString::from)
            .collect();
        let err = Flags::parse_from_args(v).unwrap_err().to_string();
        assert!(err.contains("--max-vms"), "{err}");
        let f = parse(&["-auth", "a b,"]);
        assert!(f.tokens().unwrap_err().contains("-auth"));
    }
}
