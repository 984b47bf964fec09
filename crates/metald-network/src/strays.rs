//! Namespaces named by metald's scheme that carry no ownership mark: what a
//! crash between creating a VM's namespace and marking its bridge leaves.
//! Their name is a hash, so the VM they were for is found by computing the
//! names of every VM a caller still knows, and the rest are strays.

use std::collections::HashSet;
use std::sync::Arc;

use crate::names::{self, NS_BRIDGE};
use crate::{Inner, netns, nl};

/// Whether the namespace `name` has a bridge carrying a well-formed mark
/// (the thread must be free to move between namespaces).
async fn is_marked(name: &str) -> Result<bool, String> {
    netns::enter(name)?;
    let ns = nl::connect()?;
    Ok(nl::get(&ns, NS_BRIDGE)
        .await?
        .and_then(|br0| br0.alias)
        .is_some_and(|a| names::parse_mark(&a).is_some()))
}

/// Namespaces of metald's naming scheme, not in `expected`, with no mark.
pub(crate) async fn list(
    inner: Arc<Inner>,
    expected: HashSet<String>,
) -> Result<Vec<String>, String> {
    let _ = inner;
    netns::on_thread("listing unmarked namespaces", move || async move {
        let mut found = Vec::new();
        for name in netns::list()? {
            if !names::is_netns_name(&name)
                || expected.contains(&name)
                || !netns::is_mounted(&netns::netns_path(&name))
            {
                continue;
            }
            match is_marked(&name).await {
                Ok(false) => found.push(name),
                Ok(true) => {}
                Err(e) => tracing::warn!(netns = %name, error = %e, "cannot look into a namespace"),
            }
        }
        found.sort();
        Ok(found)
    })
    .await
}

/// Deletes the namespace `name` if it is still of metald's scheme and
/// unmarked, under its name lock (so never under a create making it).
pub(crate) async fn remove(inner: Arc<Inner>, name: &str) -> Result<(), String> {
    if !names::is_netns_name(name) {
        return Err(format!("{name:?} is not a metald namespace name"));
    }
    let guard = inner.lock_name(name).await;
    let name = name.to_owned();
    let what = format!("removing unmarked namespace {name}");
    netns::on_thread(&what, move || async move {
        let _guard = guard;
        if !netns::is_mounted(&netns::netns_path(&name)) || is_marked(&name).await? {
            return Ok(());
        }
        netns::delete(&name)
    })
    .await
}
