//! The commands on one VM: create, the lifecycle moves, delete and info.
//! Each move prints `<vm> <state>` so scripts can read it.

use metald_proto::vmprovisioner::v1 as pb;

use crate::args::{Command, CreateArgs, ForceArg, InfoArgs, InfoOutput, ShutdownArgs};
use crate::client::{Api, rpc};
use crate::error::CliError;
use crate::table::state_name;
use crate::{create, output};

/// A request of type `pb::$ty` naming the VM `$vm` and nothing else.
macro_rules! for_vm {
    ($ty:ident, $vm:expr) => {
        pb::$ty {
            vm_id: $vm.clone(),
            ..Default::default()
        }
    };
}

fn moved(vm: &str, state: &buffa::EnumValue<pb::VmState>) -> String {
    format!("{} {}\n", crate::error::one_line(vm), state_name(state))
}

pub async fn create(api: &Api, args: &CreateArgs) -> Result<String, CliError> {
    let r = rpc!(api, create_vm, create::request(args)?)?;
    Ok(moved(&r.vm_id, &r.state))
}

/// boot, pause, resume, reboot and shutdown: one RPC each, then the state
/// metald reports.
pub async fn lifecycle(api: &Api, cmd: &Command) -> Result<String, CliError> {
    let (vm, state) = match cmd {
        Command::Boot(a) => {
            let req = for_vm!(BootVmRequest, a.vm);
            (&a.vm, rpc!(api, boot_vm, req)?.state)
        }
        Command::Pause(a) => {
            let req = for_vm!(PauseVmRequest, a.vm);
            (&a.vm, rpc!(api, pause_vm, req)?.state)
        }
        Command::Resume(a) => {
            let req = for_vm!(ResumeVmRequest, a.vm);
            (&a.vm, rpc!(api, resume_vm, req)?.state)
        }
        Command::Reboot(a) => {
            let req = pb::RebootVmRequest {
                force: a.force,
                ..for_vm!(RebootVmRequest, a.vm)
            };
            (&a.vm, rpc!(api, reboot_vm, req)?.state)
        }
        Command::Shutdown(a) => (&a.vm, rpc!(api, shutdown_vm, shutdown_request(a)?)?.state),
        _ => return Err(CliError::new("internal", "not a lifecycle command")),
    };
    Ok(moved(vm, &state))
}

fn shutdown_request(a: &ShutdownArgs) -> Result<pb::ShutdownVmRequest, CliError> {
    let timeout_seconds = match a.timeout {
        // Whole seconds on the wire, rounded up so 500ms still waits.
        Some(t) => i32::try_from(t.as_secs() + u64::from(t.subsec_nanos() > 0))
            .map_err(|_| CliError::usage("--timeout is too long"))?,
        None => 0,
    };
    Ok(pb::ShutdownVmRequest {
        force: a.force,
        timeout_seconds,
        ..for_vm!(ShutdownVmRequest, a.vm)
    })
}

pub async fn delete(api: &Api, a: &ForceArg) -> Result<String, CliError> {
    let req = pb::DeleteVmRequest {
        force: a.force,
        ..for_vm!(DeleteVmRequest, a.vm)
    };
    rpc!(api, delete_vm, req)?;
    Ok(format!("{} deleted\n", crate::error::one_line(&a.vm)))
}

pub async fn info(api: &Api, a: &InfoArgs) -> Result<String, CliError> {
    let req = for_vm!(GetVmInfoRequest, a.vm);
    let r = rpc!(api, get_vm_info, req)?;
    match a.output {
        Some(InfoOutput::Json) => output::json(&r),
        Some(InfoOutput::Yaml) => output::yaml(&r),
        None => Ok(output::summary(&r)),
    }
}
