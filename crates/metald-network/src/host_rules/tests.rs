//! Unit tests of the generated `nft` input.

use super::*;

fn config(isolation: Isolation, egress: bool, protect_host: bool) -> NetworkConfig {
    NetworkConfig {
        bridge: "metald0".into(),
        ipv4_subnet: "10.100.0.0/16".parse().unwrap(),
        ipv6_subnet: "fd00:1::/64".parse().unwrap(),
        isolation,
        egress,
        protect_host,
    }
}

fn input(c: &NetworkConfig, members: &[Member]) -> String {
    let l = Layout {
        config: c,
        gateway_v4: "10.100.0.1".parse().unwrap(),
        gateway_v6: "fd00:1::1".parse().unwrap(),
    };
    ruleset(&l, members)
}

fn member(veth: &str, group: u32) -> Member {
    Member {
        veth: veth.into(),
        group,
    }
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().map(str::trim).collect()
}

/// Each of `order` is a line of `r`, in this order.
fn assert_in_order(r: &str, order: &[&str]) {
    let l = lines(r);
    let at: Vec<usize> = order
        .iter()
        .map(|w| {
            l.iter()
                .position(|x| x == w)
                .unwrap_or_else(|| panic!("missing {w:?} in\n{r}"))
        })
        .collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "order of {order:?} in\n{r}"
    );
}

#[test]
fn table_names_keep_letters_and_digits_and_encode_the_rest() {
    assert_eq!(table_name("metald0"), "metald_metald0");
    assert_eq!(table_name("br-x.1"), "metald_br_2dx_2e1");
    assert_ne!(table_name("a-b"), table_name("a_b"));
}

#[test]
fn bridge_names_that_could_break_out_of_a_quoted_string_are_refused() {
    assert!(check_bridge_name("metald0").is_ok());
    assert!(check_bridge_name("br-x_1.2").is_ok());
    for bad in ["a\"b", "a b", "a;b", "a\\b", "a{b"] {
        assert!(check_bridge_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn customer_mode_lets_only_equal_groups_between_vm_ports() {
    let c = config(Isolation::Customer, false, false);
    let r = input(
        &c,
        &[
            member("mv0000000002", 7),
            member("mv0000000001", 7),
            member("mv0000000003", 9),
        ],
    );
    let l = lines(&r);
    assert_eq!(
        &l[..4],
        [
            "table bridge metald_metald0",
            "delete table bridge metald_metald0",
            "table inet metald_metald0",
            "delete table inet metald_metald0",
        ],
        "{r}"
    );
    let order = [
        "iifname != @ports accept",
        "oifname != @ports accept",
        "meta iifgroup . meta oifgroup @same accept",
        "counter drop comment \"customer\"",
    ];
    assert_in_order(&r, &order);
    for want in [
        "set same { type devgroup . devgroup; }",
        "type filter hook forward priority 0; policy accept;",
        "add element bridge metald_metald0 ports { \"mv0000000001\", \"mv0000000002\", \"mv0000000003\" }",
        "add element bridge metald_metald0 same { 7 . 7, 9 . 9 }",
        "ether type ip ip saddr 10.100.0.0/16 ip saddr != 10.100.0.1 counter drop comment \"routed-ipv4\"",
        "ether type ip6 ip6 saddr fd00:1::/64 ip6 saddr != fd00:1::1 counter drop comment \"routed-ipv6\"",
    ] {
        assert!(l.contains(&want), "missing {want:?} in\n{r}");
    }
}

#[test]
fn group_zero_is_nobodys_and_empty_sets_get_no_element_line() {
    let u = members_update(Isolation::Customer, "t", &[member("mv0000000001", 0)]);
    assert!(!u.contains("same {"), "{u}");
    assert!(
        u.contains("add element bridge t ports { \"mv0000000001\" }"),
        "{u}"
    );
    let empty = members_update(Isolation::Customer, "t", &[]);
    assert_eq!(empty, "flush set bridge t ports\nflush set bridge t same\n");
}

#[test]
fn vm_mode_drops_every_frame_between_vm_ports_and_has_no_groups() {
    let r = input(
        &config(Isolation::Vm, false, false),
        &[member("mv0000000001", 7)],
    );
    assert!(r.contains("counter drop comment \"vm\""), "{r}");
    assert!(!r.contains("@same") && !r.contains("set same"), "{r}");
    assert_eq!(
        members_update(Isolation::Vm, "t", &[member("mv0000000001", 7)]),
        "flush set bridge t ports\nadd element bridge t ports { \"mv0000000001\" }\n"
    );
}

#[test]
fn no_isolation_means_no_bridge_table_at_all() {
    let r = input(
        &config(Isolation::None, false, false),
        &[member("mv0000000001", 7)],
    );
    assert!(r.contains("delete table bridge metald_metald0"), "{r}");
    assert!(!r.contains("table bridge metald_metald0 {"), "{r}");
    assert!(!r.contains("add element"), "{r}");
    assert!(members_update(Isolation::None, "t", &[]).is_empty());
}

#[test]
fn without_egress_forwarding_off_the_bridge_is_dropped_and_nothing_is_masqueraded() {
    let r = input(&config(Isolation::Customer, false, false), &[]);
    let l = lines(&r);
    assert!(
        l.contains(&"iifname \"metald0\" oifname != \"metald0\" counter drop comment \"egress\""),
        "{r}"
    );
    assert!(
        l.contains(&"oifname \"metald0\" iifname != \"metald0\" counter drop comment \"ingress\""),
        "{r}"
    );
    assert!(
        !r.contains("masquerade") && !r.contains("chain input"),
        "{r}"
    );
}

#[test]
fn egress_masquerades_the_ipv4_subnet_and_lets_answers_back_in() {
    let r = input(&config(Isolation::Customer, true, false), &[]);
    let l = lines(&r);
    for want in [
        "iifname \"metald0\" oifname != \"metald0\" accept",
        "oifname \"metald0\" iifname != \"metald0\" ct state established,related accept",
        "oifname \"metald0\" iifname != \"metald0\" counter drop comment \"ingress\"",
        "type nat hook postrouting priority srcnat; policy accept;",
        "ip saddr 10.100.0.0/16 oifname != \"metald0\" masquerade",
    ] {
        assert!(l.contains(&want), "missing {want:?} in\n{r}");
    }
    assert!(!r.contains("comment \"egress\""), "{r}");
}

#[test]
fn a_protected_host_accepts_from_the_bridge_only_answers_icmp_dhcp_and_dns() {
    let r = input(&config(Isolation::Customer, false, true), &[]);
    let order = [
        "type filter hook input priority 0; policy accept;",
        "iifname != \"metald0\" accept",
        "ct state established,related accept",
        "icmp type echo-request accept",
        "udp dport { 53, 67, 547 } accept",
        "tcp dport 53 accept",
        "counter drop comment \"host\"",
    ];
    assert_in_order(&r, &order);
    assert!(
        r.contains("nd-router-solicit") && r.contains("nd-neighbor-solicit"),
        "{r}"
    );
}
