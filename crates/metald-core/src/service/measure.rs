//! What the service reports to its [`Telemetry`] port: each lifecycle
//! operation's outcome and duration, quota refusals and store failures.

use std::time::Instant;

use super::*;
use crate::ports::Operation;

/// The bounded outcome label of an operation's result.
pub(super) fn outcome<T>(r: &Result<T>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => match e {
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::NotFound(_) => "not_found",
            Error::AlreadyExists(_) => "already_exists",
            Error::PermissionDenied { .. } => "permission_denied",
            Error::IllegalTransition { .. } | Error::FailedPrecondition(_) => "failed_precondition",
            Error::Unimplemented(_) => "unimplemented",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::Backend(_) => "backend",
            Error::Store(_) => "store",
            Error::ResourceExhausted { .. } => "resource_exhausted",
            Error::Unavailable(_) => "unavailable",
        },
    }
}

impl VmService {
    /// Runs the operation `work` for `caller` and reports its outcome.
    pub(super) async fn measured<T>(
        &self,
        op: Operation,
        caller: &CustomerId,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let result = work.await;
        let t = &self.inner.telemetry;
        match &result {
            Err(Error::ResourceExhausted { quota, .. }) => t.quota_refused(quota, caller),
            Err(Error::Store(_)) => t.store_error(),
            _ => {}
        }
        t.operation(
            op,
            self.inner.vmm.name(),
            outcome(&result),
            caller,
            started.elapsed(),
        );
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn boot_phases_are_collected_across_awaits_and_only_inside_collect() {
        use crate::ports::{BootPhase, BootPhases};
        let ms = Duration::from_millis;
        BootPhases::record(BootPhase::Spawn, ms(100));
        let ((), p) = BootPhases::collect(async {
            BootPhases::record(BootPhase::Spawn, ms(1));
            tokio::task::yield_now().await;
            BootPhases::record(BootPhase::Spawn, ms(2));
            BootPhases::record(BootPhase::Start, ms(3));
        })
        .await;
        assert_eq!(p.spawn, Some(ms(3)), "summed, and nothing from outside");
        assert_eq!((p.socket_ready, p.configure), (None, None));
        let named: Vec<_> = p.named().collect();
        assert_eq!(named, [("spawn", ms(3)), ("start", ms(3))]);
    }
}
