//! A VM's network: addresses leased from IPAM, interfaces attached and detached.

use super::*;

impl VmService {
    /// Leases addresses and attaches every interface of a VM being
    /// created, recording the result in its spec.
    pub(super) async fn wire(&self, vm: &mut VmRecord) -> Result<()> {
        let Some(net) = &self.inner.network else {
            return Ok(());
        };
        let subnets = net.subnets();
        for i in 0..vm.spec.nics.len() {
            let nic = vm.spec.nics[i].clone();
            let ipv4 = if nic.want_v4 {
                let (n, p, _) = subnets.v4;
                let addr = self
                    .lease_one(
                        &vm.id,
                        nic.ipv4.map(IpAddr::V4),
                        net::v4_candidates(n, p).map(IpAddr::V4),
                        &format!("config.network[{i}].ipv4_config.address"),
                        (IpAddr::V4(n), p),
                    )
                    .await?;
                match addr {
                    IpAddr::V4(a) => Some((a, p)),
                    IpAddr::V6(_) => None,
                }
            } else {
                None
            };
            let ipv6 = if nic.want_v6 {
                let (n, p, _) = subnets.v6;
                let addr = self
                    .lease_one(
                        &vm.id,
                        nic.ipv6.map(IpAddr::V6),
                        net::v6_candidates(n, p).map(IpAddr::V6),
                        &format!("config.network[{i}].ipv6_config.address"),
                        (IpAddr::V6(n), p),
                    )
                    .await?;
                match addr {
                    IpAddr::V6(a) => Some((a, p)),
                    IpAddr::V4(_) => None,
                }
            } else {
                None
            };
            let mac = nic.mac.unwrap_or_else(|| net.mac_for(&vm.id, i));
            // The port is told the leased addresses: its anti-spoofing rules
            // let the guest send from them only.
            let leased = net::NicSpec {
                ipv4: ipv4.map(|(a, _)| a),
                ipv6: ipv6.map(|(a, _)| a),
                ..nic
            };
            let mut att = net
                .attach(&vm.id, &vm.customer, i, &leased, mac)
                .await
                .map_err(Error::Backend)?;
            self.inner.telemetry.network(true);
            att.ipv4 = ipv4;
            att.gateway4 = ipv4.map(|_| subnets.v4.2);
            att.ipv6 = ipv6;
            att.gateway6 = ipv6.map(|_| subnets.v6.2);
            vm.spec.nics[i].attachment = Some(att);
        }
        Ok(())
    }

    /// Leases the requested address (checked against the subnet and other
    /// VMs) or the first free candidate.
    pub(super) async fn lease_one(
        &self,
        vm: &VmId,
        requested: Option<IpAddr>,
        candidates: impl Iterator<Item = IpAddr>,
        field: &str,
        subnet: (IpAddr, u8),
    ) -> Result<IpAddr> {
        let store = &self.inner.store;
        if let Some(addr) = requested {
            if !net::contains(subnet.0, subnet.1, addr)
                || net::candidates_exclude(subnet.0, subnet.1, addr)
            {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{addr} is not a usable address of {}/{}",
                        subnet.0, subnet.1
                    ),
                ));
            }
            return match store.lease(addr, vm).await.map_err(store_err)? {
                true => Ok(addr),
                false => Err(Error::AlreadyExists(format!(
                    "{field}: {addr} is in use by another VM"
                ))),
            };
        }
        let taken: HashSet<IpAddr> = store
            .leases()
            .await
            .map_err(store_err)?
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        for addr in candidates.filter(|a| !taken.contains(a)) {
            // A concurrent create may take it first: then try the next.
            if store.lease(addr, vm).await.map_err(store_err)? {
                return Ok(addr);
            }
        }
        warn!(vm_id = %vm, subnet = %format!("{}/{}", subnet.0, subnet.1), "address pool exhausted");
        Err(Error::Unavailable(format!(
            "{field}: no free address left on this host"
        )))
    }

    /// Detaches every interface and releases every address of a VM.
    pub(super) async fn unwire(&self, id: &VmId, nics: usize) -> Result<()> {
        if let Some(net) = &self.inner.network {
            for i in 0..nics.max(1) {
                net.detach(id, i).await.map_err(Error::Backend)?;
                if i < nics {
                    self.inner.telemetry.network(false);
                }
            }
        }
        self.inner.store.release(id).await.map_err(store_err)
    }
}
