//! Checks before any side effect: the asset roots and the one-writer rule.

use std::path::PathBuf;

use super::*;
use crate::tally::Claims;

impl VmService {
    /// Checks every path of a VM against the asset roots for its customer
    /// and returns the spec the VMM must be given; run right before every
    /// spawn, so a file swapped for a link after CreateVm is still refused.
    pub(super) async fn resolve(&self, customer: &CustomerId, spec: &VmSpec) -> Result<Resolved> {
        let policy = self.inner.config.assets.clone();
        let (customer, spec) = (customer.clone(), spec.clone());
        tokio::task::spawn_blocking(move || policy.resolve(&customer, &spec))
            .await
            .map_err(|e| Error::Backend(format!("asset check did not finish: {e}")))?
    }

    /// The one-writer rule: a file attached writable to one VM is attached
    /// to no other, and a file another VM uses is not attached writable.
    /// Writable disks come only from the customer's own roots, so only the
    /// customer's own VMs can collide, and the answer tells nothing of
    /// anyone else. `others` are the files the customer's VMs attach; the caller holds the
    /// admission lock.
    pub(super) async fn check_disk_claims(
        &self,
        new: &Resolved,
        others: BTreeMap<PathBuf, Claims>,
    ) -> Result<()> {
        for (i, a) in new.disks.iter().enumerate() {
            if let Some(b) = new.disks[..i]
                .iter()
                .find(|b| b.identity == a.identity && (a.writable || b.writable))
            {
                return Err(Error::FailedPrecondition(format!(
                    "{}: the same file as {} and one of them is writable; a writable disk belongs to one device of one VM",
                    a.field, b.field
                )));
            }
        }
        let mine = new.disks.clone();
        let clash = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::MetadataExt;
            for (path, claims) in others {
                let Ok(meta) = std::fs::metadata(&path) else {
                    continue;
                };
                let identity = (meta.dev(), meta.ino());
                if let Some(a) = mine
                    .iter()
                    .find(|a| a.identity == identity && (a.writable || claims.writable > 0))
                {
                    return Some(a.field.clone());
                }
            }
            None
        })
        .await
        .map_err(|e| Error::Backend(format!("disk check did not finish: {e}")))?;
        match clash {
            Some(field) => Err(Error::FailedPrecondition(format!(
                "{field}: the file is attached to another of this customer's VMs and one of them writes it; a writable disk belongs to one VM"
            ))),
            None => Ok(()),
        }
    }
}
