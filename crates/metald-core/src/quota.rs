//! Per-customer quotas and the host's capacity: what a create or a boot may
//! add before it answers `resource_exhausted`.
//!
//! Limits come from defaults (`UNKEY_METALD_QUOTA_*`) and per-customer
//! overrides (`UNKEY_METALD_QUOTAS_FILE`, a JSON book reloaded without a
//! restart). The service checks them under one admission lock, so two
//! concurrent requests can never both take the last unit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::vm::{CustomerId, VmSpec};

/// One customer's limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_vms: Option<u64>,
    pub max_vcpus: Option<u64>,
    /// Bytes: a number, or a string like `"64GiB"`.
    #[serde(default, deserialize_with = "bytes")]
    pub max_memory: Option<u64>,
    pub max_running_vms: Option<u64>,
    pub max_interfaces: Option<u64>,
    /// Creates per minute (a token bucket whose burst is the rate).
    pub create_rate: Option<u64>,
}

fn bytes<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Number(n)) => Ok(Some(n)),
        Some(Raw::Text(s)) => parse_size(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

/// A byte size: a plain number or one with a unit (`512MiB`, `64GiB`).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| format!("{s:?} is not a size like 512MiB or 64GiB"))
}

impl Limits {
    /// These limits, with every one left unset taken from `base`.
    pub fn over(self, base: &Limits) -> Limits {
        Limits {
            max_vms: self.max_vms.or(base.max_vms),
            max_vcpus: self.max_vcpus.or(base.max_vcpus),
            max_memory: self.max_memory.or(base.max_memory),
            max_running_vms: self.max_running_vms.or(base.max_running_vms),
            max_interfaces: self.max_interfaces.or(base.max_interfaces),
            create_rate: self.create_rate.or(base.create_rate),
        }
    }
}

/// The limits of every customer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaBook {
    pub default: Limits,
    pub customers: HashMap<String, Limits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BookFile {
    #[serde(default)]
    default: Limits,
    #[serde(default)]
    customers: HashMap<String, Limits>,
}

impl QuotaBook {
    /// Reads a quotas file (`{"default": {...}, "customers": {"<id>":
    /// {...}}}`) over `defaults` (the environment's limits): the file's
    /// default overrides those, a customer's entry overrides both.
    pub fn from_json(text: &str, defaults: Limits) -> std::result::Result<Self, String> {
        let f: BookFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok(QuotaBook {
            default: f.default.over(&defaults),
            customers: f.customers,
        })
    }

    /// What `customer` may use.
    pub fn limits(&self, customer: &CustomerId) -> Limits {
        match self.customers.get(customer.as_str()) {
            Some(l) => l.over(&self.default),
            None => self.default,
        }
    }
}

/// What the host can run at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostCapacity {
    /// Running vCPUs allowed (CPUs × overcommit).
    pub vcpus: u64,
    /// Memory of running VMs allowed (host memory less the reserve).
    pub memory_bytes: u64,
}

/// What a customer's VMs (or the host's running ones) hold now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub vms: u64,
    pub vcpus: u64,
    pub memory: u64,
    pub running: u64,
    pub interfaces: u64,
}

impl Usage {
    /// Adds one VM of `spec` (running or not).
    pub fn add(&mut self, spec: &VmSpec, running: bool) {
        self.vms += 1;
        self.vcpus += u64::from(spec.vcpus());
        self.memory += spec.memory_bytes();
        self.interfaces += spec.nics().len() as u64;
        self.running += u64::from(running);
    }

    /// Adds what `other` counts.
    pub fn plus(&mut self, other: &Usage) {
        self.vms += other.vms;
        self.vcpus += other.vcpus;
        self.memory += other.memory;
        self.running += other.running;
        self.interfaces += other.interfaces;
    }

    /// Takes away what `other` counts (never below zero).
    pub fn minus(&mut self, other: &Usage) {
        self.vms = self.vms.saturating_sub(other.vms);
        self.vcpus = self.vcpus.saturating_sub(other.vcpus);
        self.memory = self.memory.saturating_sub(other.memory);
        self.running = self.running.saturating_sub(other.running);
        self.interfaces = self.interfaces.saturating_sub(other.interfaces);
    }
}

fn exhausted(quota: &'static str, limit: u64, used: u64, unit: &str) -> Error {
    Error::ResourceExhausted {
        quota,
        message: format!("quota {quota} exceeded: limit {limit}{unit}, in use {used}{unit}"),
    }
}

/// Whether a new VM of `spec` fits the customer's limits beside `used`.
pub fn check_create(limits: &Limits, used: &Usage, spec: &VmSpec) -> Result<()> {
    let asks = [
        ("max_vms", limits.max_vms, used.vms, 1, ""),
        (
            "max_vcpus",
            limits.max_vcpus,
            used.vcpus,
            u64::from(spec.vcpus()),
            "",
        ),
        (
            "max_memory",
            limits.max_memory,
            used.memory,
            spec.memory_bytes(),
            " bytes",
        ),
        (
            "max_interfaces",
            limits.max_interfaces,
            used.interfaces,
            spec.nics().len() as u64,
            "",
        ),
    ];
    for (quota, limit, in_use, more, unit) in asks {
        if let Some(limit) = limit
            && in_use.saturating_add(more) > limit
        {
            return Err(exhausted(quota, limit, in_use, unit));
        }
    }
    Ok(())
}

/// Whether one more running VM of `spec` fits the customer's limit and the
/// host's capacity, beside the customer's and the host's running VMs.
pub fn check_boot(
    limits: &Limits,
    customer: &Usage,
    host: Option<(&HostCapacity, &Usage)>,
    spec: &VmSpec,
) -> Result<()> {
    if let Some(limit) = limits.max_running_vms
        && customer.running >= limit
    {
        return Err(exhausted("max_running_vms", limit, customer.running, ""));
    }
    if let Some((cap, running)) = host {
        let vcpus = running.vcpus.saturating_add(u64::from(spec.vcpus()));
        let memory = running.memory.saturating_add(spec.memory_bytes());
        if vcpus > cap.vcpus || memory > cap.memory_bytes {
            let message = format!(
                "host capacity: {} vCPUs and {} bytes of memory are committed to running VMs \
                 of the {} vCPUs and {} bytes this host offers; this VM needs {} and {}",
                running.vcpus,
                running.memory,
                cap.vcpus,
                cap.memory_bytes,
                spec.vcpus(),
                spec.memory_bytes()
            );
            return Err(Error::ResourceExhausted {
                quota: "host_capacity",
                message,
            });
        }
    }
    Ok(())
}

/// Most customers whose create-rate buckets are kept; full buckets (those
/// that have not been used for a while) are dropped first.
const MAX_BUCKETS: usize = 10_000;

/// Per-customer token buckets for the create rate.
#[derive(Debug, Default)]
pub struct CreateRate(Mutex<HashMap<CustomerId, (f64, Instant)>>);

impl CreateRate {
    /// Takes one create from `customer`'s bucket of `per_minute` (burst =
    /// rate), or answers when the next one will be allowed.
    pub fn take(&self, customer: &CustomerId, per_minute: u64) -> Result<()> {
        let now = Instant::now();
        let cap = per_minute as f64;
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_BUCKETS && !map.contains_key(customer) {
            map.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * cap / 60.0 < cap
            });
        }
        let (tokens, at) = map.entry(customer.clone()).or_insert((cap, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * cap / 60.0).min(cap);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(());
        }
        let wait = if cap > 0.0 {
            ((1.0 - *tokens) * 60.0 / cap).ceil()
        } else {
            60.0
        };
        Err(Error::ResourceExhausted {
            quota: "create_rate",
            message: format!(
                "quota create_rate exceeded: limit {per_minute} creates per minute; retry in {wait} s"
            ),
        })
    }

    /// Returns a create [`take`](Self::take)n for one that was refused
    /// before it made anything (another quota, a name in use): only
    /// creates that happen count against the rate.
    pub fn give_back(&self, customer: &CustomerId, per_minute: u64) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((tokens, _)) = map.get_mut(customer) {
            *tokens = (*tokens + 1.0).min(per_minute as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::VmSpecInput;

    fn spec(vcpus: i32, memory: i64) -> VmSpec {
        VmSpec::new(VmSpecInput {
            vcpu_count: vcpus,
            memory_bytes: memory,
            kernel_path: "/k".into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn a_customer_entry_overrides_the_file_default_which_overrides_the_environment() {
        let env = Limits {
            max_vms: Some(100),
            max_vcpus: Some(64),
            ..Limits::default()
        };
        let book = QuotaBook::from_json(
            r#"{"default": {"max_vms": 10, "max_memory": "1GiB"},
                "customers": {"acme": {"max_vms": 2}}}"#,
            env,
        )
        .unwrap();
        let acme = book.limits(&CustomerId::parse("acme").unwrap());
        assert_eq!(
            (acme.max_vms, acme.max_vcpus, acme.max_memory),
            (Some(2), Some(64), Some(1 << 30))
        );
        let other = book.limits(&CustomerId::parse("globex").unwrap());
        assert_eq!(other.max_vms, Some(10));
        for bad in [
            r#"{"defaults": {}}"#,
            r#"{"default": {"max_vm": 1}}"#,
            r#"{"default": {"max_memory": "lots"}}"#,
        ] {
            assert!(QuotaBook::from_json(bad, env).is_err(), "{bad}");
        }
    }

    /// The quota a refusal carries (what metrics label it with).
    fn quota(e: &Error) -> &'static str {
        match e {
            Error::ResourceExhausted { quota, .. } => quota,
            other => panic!("not a quota refusal: {other:?}"),
        }
    }

    #[test]
    fn every_quota_names_itself_its_limit_and_the_use() {
        let limits = Limits {
            max_vms: Some(2),
            max_vcpus: Some(4),
            max_memory: Some(1 << 30),
            ..Limits::default()
        };
        let mut used = Usage::default();
        used.add(&spec(2, 256 << 20), false);
        check_create(&limits, &used, &spec(2, 256 << 20)).unwrap();
        used.add(&spec(2, 256 << 20), false);
        let e = check_create(&limits, &used, &spec(1, 64 << 20)).unwrap_err();
        assert!(
            e.to_string().contains("max_vms") && e.to_string().contains("limit 2, in use 2"),
            "{e}"
        );
        assert_eq!(quota(&e), "max_vms");
        let e = check_create(
            &Limits {
                max_vms: None,
                ..limits
            },
            &used,
            &spec(1, 64 << 20),
        )
        .unwrap_err();
        assert!(e.to_string().contains("max_vcpus"), "{e}");
        assert_eq!(quota(&e), "max_vcpus");
        let roomy = Limits {
            max_vms: None,
            max_vcpus: None,
            ..limits
        };
        let e = check_create(&roomy, &used, &spec(1, 1 << 30)).unwrap_err();
        assert!(e.to_string().contains("max_memory"), "{e}");
        assert_eq!(quota(&e), "max_memory");
        let host = HostCapacity {
            vcpus: 4,
            memory_bytes: 1 << 30,
        };
        let running = Usage {
            vcpus: 3,
            memory: 1 << 29,
            ..Usage::default()
        };
        check_boot(&roomy, &used, Some((&host, &running)), &spec(1, 64 << 20)).unwrap();
        let e = check_boot(&roomy, &used, Some((&host, &running)), &spec(2, 64 << 20)).unwrap_err();
        assert!(e.to_string().contains("host capacity"), "{e}");
        assert_eq!(quota(&e), "host_capacity");
    }

    #[test]
    fn the_create_rate_refills_and_says_when_to_retry() {
        let r = CreateRate::default();
        let me = CustomerId::parse("acme").unwrap();
        let you = CustomerId::parse("globex").unwrap();
        for _ in 0..3 {
            r.take(&me, 3).unwrap();
        }
        let e = r.take(&me, 3).unwrap_err();
        assert!(e.to_string().contains("retry in"), "{e}");
        assert_eq!(quota(&e), "create_rate");
        r.take(&you, 3)
            .expect("another customer has its own bucket");
    }
}
