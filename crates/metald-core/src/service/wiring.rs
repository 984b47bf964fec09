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
        for i in 0..vm.spec.nics().len() {
            let nic = vm.spec.nics()[i].clone();
            let mac = nic.mac.unwrap_or_else(|| net.mac_for(&vm.id, i));
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
                self.lease_v6(&vm.id, i, &nic, mac, subnets.v6).await?
            } else {
                None
            };
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
                .map_err(net_err)?;
            self.inner.telemetry.network(true);
            att.ipv4 = ipv4;
            att.gateway4 = ipv4.map(|_| subnets.v4.2);
            att.ipv6 = ipv6;
            att.gateway6 = ipv6.map(|_| subnets.v6.2);
            vm.spec.set_attachment(i, Some(att));
        }
        Ok(())
    }

    /// Leases interface `i`'s IPv6 address: the client's, else in a /64 the
    /// EUI-64 address of the MAC, which the guest's SLAAC forms by itself
    /// (the next free address if another VM holds it, with a warning: the
    /// guest then needs the kernel command line), else the first free one.
    async fn lease_v6(
        &self,
        vm: &VmId,
        i: usize,
        nic: &net::NicSpec,
        mac: crate::Mac,
        (n, p, _): (std::net::Ipv6Addr, u8, std::net::Ipv6Addr),
    ) -> Result<Option<(std::net::Ipv6Addr, u8)>> {
        let slaac = net::eui64(n, p, mac).filter(|_| nic.ipv6.is_none());
        let addr = self
            .lease_one(
                vm,
                nic.ipv6.map(IpAddr::V6),
                slaac
                    .into_iter()
                    .chain(net::v6_candidates(n, p))
                    .map(IpAddr::V6),
                &format!("config.network[{i}].ipv6_config.address"),
                (IpAddr::V6(n), p),
            )
            .await?;
        let IpAddr::V6(a) = addr else {
            return Ok(None);
        };
        if slaac.is_some_and(|s| s != a) {
            warn!(vm_id = %vm, mac = %mac, address = %a, "the SLAAC address of this MAC is leased to another VM: the guest needs its kernel command line for IPv6");
        }
        Ok(Some((a, p)))
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
                net.detach(id, i).await.map_err(net_err)?;
                if i < nics {
                    self.inner.telemetry.network(false);
                }
            }
        }
        self.inner.store.release(id).await.map_err(store_err)
    }
}
