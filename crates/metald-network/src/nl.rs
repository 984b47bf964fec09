//! Small helpers over rtnetlink.

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};

/// Opens a netlink socket in the calling thread's current network namespace
/// and drives it on the current runtime.
pub(crate) fn connect() -> Result<Handle, String> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| format!("opening a netlink socket: {e}"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The parts of a link we look at.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) alias: Option<String>,
    pub(crate) kind: Option<InfoKind>,
    /// Index of the bridge (or other controller) it is a port of.
    pub(crate) controller: Option<u32>,
    /// Its device group (`ip link set DEV group N`).
    pub(crate) group: u32,
}

impl From<LinkMessage> for Link {
    fn from(m: LinkMessage) -> Self {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            alias: None,
            kind: None,
            controller: None,
            group: 0,
        };
        for attr in m.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::IfAlias(a) if !a.is_empty() => link.alias = Some(a),
                LinkAttribute::Controller(c) => link.controller = Some(c),
                LinkAttribute::Group(g) => link.group = g,
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            link.kind = Some(k);
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// The errno of a netlink error reply, if that is what `e` is.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// Looks a link up by name; `None` if there is none.
pub(crate) async fn get(h: &Handle, name: &str) -> Result<Option<Link>, String> {
    let mut replies = h.link().get().match_name(name).execute();
    match replies.try_next().await {
        Ok(m) => Ok(m.map(Link::from)),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(format!("looking up link {name}: {e}")),
    }
}

/// Every link.
pub(crate) async fn dump(h: &Handle) -> Result<Vec<Link>, String> {
    h.link()
        .get()
        .execute()
        .map_ok(Link::from)
        .try_collect()
        .await
        .map_err(|e| format!("listing links: {e}"))
}

/// Deletes a link; already gone is fine.
pub(crate) async fn del(h: &Handle, link: &Link) -> Result<(), String> {
    match h.link().del(link.index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(format!("deleting link {}: {e}", link.name)),
    }
}

/// Adds a link (a full `RTM_NEWLINK` create message).
pub(crate) async fn add(h: &Handle, what: &str, msg: LinkMessage) -> Result<(), String> {
    h.link()
        .add(msg)
        .execute()
        .await
        .map_err(|e| format!("creating {what}: {e}"))
}

/// `ip link set` with the given message.
pub(crate) async fn change(h: &Handle, what: &str, msg: LinkMessage) -> Result<(), String> {
    h.link()
        .change(msg)
        .execute()
        .await
        .map_err(|e| format!("configuring {what}: {e}"))
}

/// `ip link set dev NAME up`.
pub(crate) async fn up(h: &Handle, name: &str) -> Result<(), String> {
    change(h, name, LinkUnspec::new_with_name(name).up().build()).await
}
