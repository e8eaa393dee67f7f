//! A router's address translation as one nftables table in its namespace, written and read
//! with nftables' JSON schema (the `nftables` crate's types).
//!
//! The table `ip ferro-router` holds two NAT chains:
//! - `prerouting` (hook prerouting, priority dstnat): `ip daddr FIP dnat to FIXED` per
//!   floating IP;
//! - `postrouting` (hook postrouting, priority srcnat): `ip saddr FIXED oifname QG snat to
//!   FIP` per floating IP, then, unless SNAT is off, `ip saddr SUBNET oifname QG snat to
//!   GATEWAY` per tenant subnet.
//!
//! Every rule carries a comment saying what it is for (`fip 203.0.113.20 10.0.0.5`, `snat
//! 10.0.0.0/24`). Reading the table back gives the `(chain, comment)` pairs it has
//! ([`Table::fingerprint`]); when they differ from what is wanted — a rule flushed or added
//! by hand, a floating IP moved — the whole table is replaced in one transaction (`add
//! table; delete table; add table, chains, rules`), so no packet ever sees half a table.
//! Conntrack keeps the translation of established connections whatever happens to the
//! rules, so replacing the table, or restarting the agent, breaks no connection.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table as NfTable};
use nftables::stmt::{Match, NAT, Operator, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};

/// The name of a router's table, in its own namespace.
pub const TABLE: &str = "ferro-router";
/// The chain of destination NAT.
pub const PREROUTING: &str = "prerouting";
/// The chain of source NAT.
pub const POSTROUTING: &str = "postrouting";

/// What a router's table must translate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Table {
    /// The gateway leg's device inside the namespace: translation applies to what leaves
    /// (or arrives) there.
    pub gateway_device: String,
    /// The gateway address tenant subnets leave as, when SNAT is on.
    pub snat_to: Option<IpAddr>,
    /// The tenant subnets.
    pub subnets: Vec<IpNet>,
    /// Floating address → private address.
    pub mappings: Vec<(IpAddr, IpAddr)>,
    /// Whether TCP to the metadata address arriving on a tenant leg goes to the metadata
    /// service's port in the namespace.
    pub metadata: bool,
}

impl Table {
    /// The `(chain, comment)` pairs of the rules, in order.
    fn rules(&self) -> Vec<(&'static str, String, Vec<Statement<'static>>)> {
        let mut rules = Vec::new();
        let out = self.gateway_device.clone();
        if self.metadata {
            rules.push((
                PREROUTING,
                "metadata".to_owned(),
                vec![
                    matches(
                        iifname(),
                        Expression::String(Cow::Owned(format!(
                            "{}*",
                            super::plan::LEG_DEVICE_PREFIX
                        ))),
                    ),
                    matches(
                        ip_field("daddr"),
                        Expression::String(Cow::Borrowed(crate::metadata::METADATA_ADDRESS)),
                    ),
                    matches(
                        Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                            PayloadField {
                                protocol: Cow::Borrowed("tcp"),
                                field: Cow::Borrowed("dport"),
                            },
                        ))),
                        Expression::Number(80),
                    ),
                    Statement::Redirect(Some(NAT {
                        addr: None,
                        family: None,
                        port: Some(Expression::Number(u32::from(
                            crate::metadata::METADATA_PORT,
                        ))),
                        flags: None,
                    })),
                ],
            ));
        }
        for (fip, fixed) in &self.mappings {
            rules.push((
                PREROUTING,
                format!("fip {fip} {fixed}"),
                vec![
                    matches(ip_field("daddr"), address(*fip)),
                    Statement::DNAT(Some(nat_to(*fixed))),
                ],
            ));
        }
        for (fip, fixed) in &self.mappings {
            rules.push((
                POSTROUTING,
                format!("fip {fip} {fixed}"),
                vec![
                    matches(ip_field("saddr"), address(*fixed)),
                    matches(oifname(), Expression::String(Cow::Owned(out.clone()))),
                    Statement::SNAT(Some(nat_to(*fip))),
                ],
            ));
        }
        if let Some(gateway) = self.snat_to {
            for subnet in &self.subnets {
                rules.push((
                    POSTROUTING,
                    format!("snat {subnet}"),
                    vec![
                        matches(ip_field("saddr"), prefix(*subnet)),
                        matches(oifname(), Expression::String(Cow::Owned(out.clone()))),
                        Statement::SNAT(Some(nat_to(gateway))),
                    ],
                ));
            }
        }
        rules
    }

    /// What reading the table back must give: its rules' `(chain, comment)` pairs.
    pub fn fingerprint(&self) -> BTreeSet<(String, String)> {
        self.rules()
            .into_iter()
            .map(|(chain, comment, _)| (chain.to_owned(), comment))
            .collect()
    }

    /// The transaction that replaces the table with this one (made first if missing).
    pub fn replace(&self) -> Nftables<'static> {
        let table = || NfTable {
            family: NfFamily::IP,
            name: Cow::Borrowed(TABLE),
            handle: None,
        };
        let mut objects = vec![
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
        ];
        for (name, hook, priority) in [
            (PREROUTING, NfHook::Prerouting, -100),
            (POSTROUTING, NfHook::Postrouting, 100),
        ] {
            objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(
                Chain {
                    family: NfFamily::IP,
                    table: Cow::Borrowed(TABLE),
                    name: Cow::Borrowed(name),
                    _type: Some(NfChainType::NAT),
                    hook: Some(hook),
                    prio: Some(priority),
                    ..Chain::default()
                },
            ))));
        }
        for (chain, comment, expr) in self.rules() {
            objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
                family: NfFamily::IP,
                table: Cow::Borrowed(TABLE),
                chain: Cow::Borrowed(chain),
                expr: Cow::Owned(expr),
                handle: None,
                index: None,
                comment: Some(Cow::Owned(comment)),
            }))));
        }
        Nftables {
            objects: Cow::Owned(objects),
        }
    }
}

/// The transaction that removes the table, if it is there.
pub fn remove() -> Nftables<'static> {
    let table = || NfTable {
        family: NfFamily::IP,
        name: Cow::Borrowed(TABLE),
        handle: None,
    };
    Nftables {
        objects: Cow::Owned(vec![
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
        ]),
    }
}

/// The `(chain, comment)` pairs of the rules in `listed` (the output of `nft -j list table
/// ip ferro-router`), and whether both chains are there.
pub fn read(listed: &Nftables) -> (BTreeSet<(String, String)>, bool) {
    let mut rules = BTreeSet::new();
    let mut chains = BTreeSet::new();
    for object in listed.objects.iter() {
        match object {
            NfObject::ListObject(NfListObject::Chain(c)) if c.table == TABLE => {
                chains.insert(c.name.to_string());
            }
            NfObject::ListObject(NfListObject::Rule(r)) if r.table == TABLE => {
                rules.insert((
                    r.chain.to_string(),
                    r.comment.as_deref().unwrap_or_default().to_owned(),
                ));
            }
            _ => {}
        }
    }
    let whole = chains.contains(PREROUTING) && chains.contains(POSTROUTING);
    (rules, whole)
}

fn matches(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn ip_field(field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed("ip"),
            field: Cow::Borrowed(field),
        },
    )))
}

fn iifname() -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta {
        key: MetaKey::Iifname,
    }))
}

fn oifname() -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta {
        key: MetaKey::Oifname,
    }))
}

fn address(ip: IpAddr) -> Expression<'static> {
    Expression::String(Cow::Owned(ip.to_string()))
}

fn prefix(net: IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(address(net.network())),
        len: u32::from(net.prefix_len()),
    }))
}

fn nat_to(ip: IpAddr) -> NAT<'static> {
    NAT {
        addr: Some(address(ip)),
        family: None,
        port: None,
        flags: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            gateway_device: "qg-1".into(),
            snat_to: Some("203.0.113.10".parse().unwrap()),
            subnets: vec!["10.0.0.0/24".parse().unwrap()],
            mappings: vec![("203.0.113.20".parse().unwrap(), "10.0.0.5".parse().unwrap())],
            metadata: false,
        }
    }

    #[test]
    fn the_transaction_replaces_the_table_whole() {
        let json = serde_json::to_value(table().replace()).unwrap();
        let commands = json["nftables"].as_array().unwrap();
        assert_eq!(
            commands.len(),
            3 + 2 + 3,
            "table thrice, two chains, three rules"
        );
        assert!(commands[1]["delete"]["table"]["name"] == TABLE);
        let text = json.to_string();
        assert!(text.contains(r#""dnat":{"addr":"10.0.0.5"}"#), "{text}");
        assert!(
            text.contains(r#""prefix":{"addr":"10.0.0.0","len":24}"#),
            "{text}"
        );
        assert!(text.contains(r#""comment":"snat 10.0.0.0/24""#), "{text}");
    }

    #[test]
    fn a_listed_table_reads_back_as_its_fingerprint() {
        let wanted = table();
        // What `nft -j list table` prints for the table, less handles and metainfo.
        let listed: Nftables = serde_json::from_value(serde_json::json!({"nftables": [
            {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
            {"table": {"family": "ip", "name": TABLE, "handle": 1}},
            {"chain": {"family": "ip", "table": TABLE, "name": PREROUTING, "handle": 1,
                       "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
            {"chain": {"family": "ip", "table": TABLE, "name": POSTROUTING, "handle": 2,
                       "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}},
            {"rule": {"family": "ip", "table": TABLE, "chain": PREROUTING, "handle": 3,
                      "comment": "fip 203.0.113.20 10.0.0.5", "expr": []}},
            {"rule": {"family": "ip", "table": TABLE, "chain": POSTROUTING, "handle": 4,
                      "comment": "fip 203.0.113.20 10.0.0.5", "expr": []}},
            {"rule": {"family": "ip", "table": TABLE, "chain": POSTROUTING, "handle": 5,
                      "comment": "snat 10.0.0.0/24", "expr": []}},
        ]}))
        .unwrap();
        let (rules, whole) = read(&listed);
        assert!(whole);
        assert_eq!(rules, wanted.fingerprint());
        let without_snat = Table {
            snat_to: None,
            ..wanted
        };
        assert_ne!(rules, without_snat.fingerprint());
    }
}
