//! The table `ferro get` prints: `NAME`, a few columns chosen per kind, `AGE`, in aligned
//! columns as kubectl prints them. `-o wide` adds columns; `-A` adds `PROJECT` in front.
//!
//! Columns read typed fields, so a schema change that drops a field breaks the build here
//! rather than printing empty columns.

use std::time::{SystemTime, UNIX_EPOCH};

use ferro_api::{Object, v1};

/// What an empty cell shows.
const NONE: &str = "<none>";

/// Renders objects of one kind as a table, one line per object, with a header.
pub fn render(objects: &[Object], wide: bool, show_project: bool) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let mut header: Vec<&'static str> = Vec::new();
    let mut rows: Vec<Vec<String>> = Vec::new();
    for object in objects {
        let mut cells: Vec<(&'static str, String)> = Vec::new();
        if show_project {
            cells.push(("PROJECT", object.project().to_owned()));
        }
        cells.push(("NAME", object.name().to_owned()));
        cells.extend(columns(object, wide));
        cells.push(("AGE", age(object, now)));
        if header.is_empty() {
            header = cells.iter().map(|(h, _)| *h).collect();
        }
        rows.push(
            cells
                .into_iter()
                .map(|(_, v)| if v.is_empty() { NONE.to_owned() } else { v })
                .collect(),
        );
    }
    align(&header, &rows)
}

/// Aligns a header and rows in columns separated by three spaces.
pub fn align(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `5s`, `3m`, `2h`, `4d`, from the object's creation time.
fn age(object: &Object, now: i64) -> String {
    let Some(created) = object
        .metadata()
        .and_then(|m| m.creation_timestamp.as_ref())
    else {
        return String::new();
    };
    duration(now - created.seconds)
}

/// A span of seconds as kubectl shows ages: `5s`, `3m`, `2h`, `4d`.
pub fn duration(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 120 * 60 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// The status of a condition type, `True` / `False` / `Unknown`, or empty.
fn condition(conditions: &[v1::Condition], kind: &str) -> String {
    conditions
        .iter()
        .find(|c| c.r#type == kind)
        .map(|c| enum_name(c.status().as_str_name()))
        .unwrap_or_default()
}

/// The reason `Ready` is not `True` (`NoNetworkNode`, `NoRouter`, `WaitingForAgent`);
/// empty once it is.
fn not_ready_reason(conditions: &[v1::Condition]) -> String {
    conditions
        .iter()
        .find(|c| c.r#type == "Ready" && c.status != v1::condition::Status::True as i32)
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

/// A Server's STATUS as kubectl shows a pod's: the reason that holds it where `Ready` is
/// False for one (`FlavorNotFound`, `NoValidHost`, `ImageNotFound`, `Stopped`), else the
/// phase. The reasons that only restate the phase (`Building`, `Unscheduled`) show the
/// phase.
fn server_status(status: &v1::ServerStatus) -> String {
    use v1::server_status::Phase;
    let phase = status.phase();
    let ready = status.conditions.iter().find(|c| c.r#type == "Ready");
    match ready {
        _ if matches!(phase, Phase::Deleting | Phase::Unknown) => enum_name(phase.as_str_name()),
        Some(c)
            if c.status == v1::condition::Status::False as i32
                && !c.reason.is_empty()
                && !matches!(c.reason.as_str(), "Building" | "Unscheduled") =>
        {
            c.reason.clone()
        }
        _ => enum_name(phase.as_str_name()),
    }
}

/// An enum value as users write it; empty for the unspecified zero value.
fn enum_name(name: &str) -> String {
    if name.ends_with("_UNSPECIFIED") {
        String::new()
    } else {
        name.to_owned()
    }
}

/// `512Mi`, `2Gi`.
fn mebibytes(mib: u64) -> String {
    match mib {
        0 => String::new(),
        m if m % 1024 == 0 => format!("{}Gi", m / 1024),
        m => format!("{m}Mi"),
    }
}

fn gibibytes(gib: u64) -> String {
    if gib == 0 {
        String::new()
    } else {
        format!("{gib}Gi")
    }
}

/// `1.5Gi`, `300Mi`, `12Ki`, `5B`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "Ki", "Mi", "Gi", "Ti"];
    if n == 0 {
        return String::new();
    }
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 10.0 {
        format!("{value:.0}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// A copy of an optional part, or its default. Generic, so it reads the same whether the
/// generated type is `Copy` or not.
fn or_default<T: Clone + Default>(part: &Option<T>) -> T {
    part.clone().unwrap_or_default()
}

fn number<T: PartialEq + Default + ToString>(n: T) -> String {
    if n == T::default() {
        String::new()
    } else {
        n.to_string()
    }
}

fn join<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    items
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

fn owner(meta: Option<&v1::ObjectMeta>) -> String {
    meta.and_then(|m| m.owner_references.first())
        .map(|o| format!("{}/{}", o.kind.to_ascii_lowercase(), o.name))
        .unwrap_or_default()
}

/// The kind-specific columns of one object (between NAME and AGE).
fn columns(object: &Object, wide: bool) -> Vec<(&'static str, String)> {
    let mut cells = Vec::new();
    let mut wide_cells = Vec::new();
    match object {
        Object::Server(o) => {
            let spec = or_default(&o.spec);
            let status = or_default(&o.status);
            let image = if spec.image.is_empty() && !spec.boot_volume.is_empty() {
                format!("volume:{}", spec.boot_volume)
            } else {
                spec.image.clone()
            };
            cells.push(("STATUS", server_status(&status)));
            cells.push(("NODE", status.node.clone()));
            cells.push(("FLAVOR", spec.flavor.clone()));
            cells.push(("IMAGE", image));
            let ips = status
                .addresses
                .iter()
                .flat_map(|a| a.ips.iter().map(String::as_str));
            wide_cells.push(("ADDRESSES", join(ips)));
            wide_cells.push(("POWER", enum_name(spec.power_state().as_str_name())));
            wide_cells.push(("READY", condition(&status.conditions, "Ready")));
        }
        Object::Network(o) => {
            let spec = or_default(&o.spec);
            let status = or_default(&o.status);
            cells.push((
                "SUBNETS",
                join(spec.subnets.iter().map(|s| s.cidr.as_str())),
            ));
            cells.push(("SEGMENT", number(status.segment_id)));
            cells.push(("READY", condition(&status.conditions, "Ready")));
            wide_cells.push(("SHARED", spec.shared.unwrap_or(false).to_string()));
            wide_cells.push(("EXTERNAL", spec.external.unwrap_or(false).to_string()));
            wide_cells.push(("MTU", spec.mtu.map(|m| m.to_string()).unwrap_or_default()));
        }
        Object::Port(o) => {
            let spec = or_default(&o.spec);
            let status = or_default(&o.status);
            let mac = if status.mac.is_empty() {
                spec.mac_address.clone()
            } else {
                status.mac.clone()
            };
            cells.push(("NETWORK", spec.network.clone()));
            cells.push(("MAC", mac));
            cells.push((
                "ADDRESSES",
                join(status.addresses.iter().map(|a| a.ip.as_str())),
            ));
            wide_cells.push(("NODE", status.node.clone()));
            wide_cells.push(("BOUND", status.bound.to_string()));
            wide_cells.push(("OWNER", owner(o.metadata.as_ref())));
        }
        Object::Flavor(o) => {
            let spec = or_default(&o.spec);
            cells.push(("VCPUS", number(spec.vcpus)));
            cells.push(("RAM", mebibytes(spec.ram_mib)));
            cells.push(("DISK", gibibytes(spec.disk_gib)));
            wide_cells.push(("EPHEMERAL", gibibytes(spec.ephemeral_gib)));
            wide_cells.push(("DESCRIPTION", spec.description.clone()));
        }
        Object::Image(o) => {
            let spec = or_default(&o.spec);
            let status = or_default(&o.status);
            let format = if status.format.is_empty() {
                enum_name(spec.disk_format().as_str_name())
            } else {
                status.format.clone()
            };
            cells.push(("PHASE", enum_name(status.phase().as_str_name())));
            cells.push(("FORMAT", format));
            cells.push(("SIZE", bytes(status.size_bytes)));
            wide_cells.push(("VISIBILITY", enum_name(spec.visibility().as_str_name())));
            wide_cells.push(("SOURCE", spec.source.map(|s| s.url).unwrap_or_default()));
        }
        Object::Node(o) => {
            let status = or_default(&o.status);
            let capacity = or_default(&status.capacity);
            cells.push(("READY", condition(&status.conditions, "Ready")));
            cells.push(("VCPUS", number(capacity.vcpus)));
            cells.push(("RAM", mebibytes(capacity.ram_mib)));
            cells.push(("ZONE", status.zone.clone()));
            let roles: Vec<String> = status.roles().map(|r| enum_name(r.as_str_name())).collect();
            wide_cells.push(("ADDRESS", status.address.clone()));
            wide_cells.push(("HYPERVISOR", status.hypervisor.clone()));
            wide_cells.push(("ROLES", join(roles.iter().map(String::as_str))));
        }
        Object::Router(o) => {
            let spec = or_default(&o.spec);
            let status = or_default(&o.status);
            let gateway = spec.external_gateway.map(|g| g.network).unwrap_or_default();
            cells.push(("GATEWAY", gateway));
            cells.push((
                "INTERFACES",
                join(spec.interfaces.iter().map(|i| i.network.as_str())),
            ));
            cells.push(("NODE", status.node.clone()));
            cells.push(("READY", condition(&status.conditions, "Ready")));
            wide_cells.push((
                "EXTERNAL-IPS",
                join(status.external_ips.iter().map(String::as_str)),
            ));
            wide_cells.push(("REASON", not_ready_reason(&status.conditions)));
        }
        Object::FloatingIP(o) => {
            let spec = or_default(&o.spec);
            let status = or_default(&o.status);
            let target = match (spec.server.is_empty(), spec.port.is_empty()) {
                (false, _) => format!("server/{}", spec.server),
                (true, false) => format!("port/{}", spec.port),
                (true, true) => String::new(),
            };
            cells.push(("ADDRESS", status.address.clone()));
            cells.push(("NETWORK", spec.network.clone()));
            cells.push(("TARGET", target));
            cells.push(("FIXED-IP", status.fixed_ip.clone()));
            cells.push(("READY", condition(&status.conditions, "Ready")));
            wide_cells.push((
                "PORT",
                ferro_controllers::floatingip::associated_port(&status.conditions)
                    .unwrap_or_default()
                    .to_owned(),
            ));
            wide_cells.push(("ROUTER", status.router.clone()));
            wide_cells.push(("REASON", not_ready_reason(&status.conditions)));
        }
        Object::SecurityGroup(o) => {
            let spec = or_default(&o.spec);
            cells.push(("RULES", spec.rules.len().to_string()));
            cells.push(("DESCRIPTION", spec.description.clone()));
        }
        Object::Volume(o) => {
            let spec = or_default(&o.spec);
            let status = or_default(&o.status);
            cells.push(("PHASE", enum_name(status.phase().as_str_name())));
            cells.push(("SIZE", gibibytes(spec.size_gib)));
            cells.push(("NODE", status.node.clone()));
            cells.push((
                "ATTACHED-TO",
                join(status.attachments.iter().map(|a| a.server.as_str())),
            ));
            wide_cells.push(("TYPE", spec.volume_type.clone()));
            wide_cells.push(("BOOTABLE", spec.bootable.unwrap_or(false).to_string()));
            wide_cells.push(("REASON", not_ready_reason(&status.conditions)));
        }
        Object::VolumeSnapshot(o) => {
            let spec = or_default(&o.spec);
            let status = or_default(&o.status);
            cells.push(("VOLUME", spec.volume.clone()));
            cells.push(("PHASE", enum_name(status.phase().as_str_name())));
            cells.push(("SIZE", gibibytes(status.size_gib)));
        }
        Object::KeyPair(o) => {
            let status = or_default(&o.status);
            cells.push(("FINGERPRINT", status.fingerprint.clone()));
        }
        Object::ServerGroup(o) => {
            let spec = or_default(&o.spec);
            let status = or_default(&o.status);
            cells.push(("POLICY", enum_name(spec.policy().as_str_name())));
            cells.push(("MEMBERS", status.members.len().to_string()));
        }
        Object::Project(o) => {
            let spec = or_default(&o.spec);
            let status = or_default(&o.status);
            cells.push(("PHASE", enum_name(status.phase().as_str_name())));
            cells.push(("DESCRIPTION", spec.description.clone()));
        }
        Object::User(o) => {
            let spec = or_default(&o.spec);
            cells.push(("DISPLAY-NAME", spec.display_name.clone()));
            cells.push(("ENABLED", spec.enabled.unwrap_or(true).to_string()));
        }
        Object::RoleBinding(o) => {
            let spec = or_default(&o.spec);
            cells.push(("USER", spec.user.clone()));
            cells.push(("ROLE", enum_name(spec.role().as_str_name())));
        }
        Object::Quota(o) => {
            let hard = or_default(&o.spec).hard.unwrap_or_default();
            let limits = [
                ("servers", hard.servers),
                ("vcpus", hard.vcpus),
                ("ramMib", hard.ram_mib),
                ("volumes", hard.volumes),
                ("volumeGib", hard.volume_gib),
                ("networks", hard.networks),
                ("ports", hard.ports),
                ("routers", hard.routers),
                ("floatingIps", hard.floating_ips),
                ("securityGroups", hard.security_groups),
            ];
            let shown: Vec<String> = limits
                .iter()
                .filter_map(|(name, value)| value.map(|v| format!("{name}={v}")))
                .collect();
            cells.push(("HARD", shown.join(",")));
        }
        Object::Event(o) => {
            let spec = or_default(&o.spec);
            let involved = spec
                .involved_object
                .as_ref()
                .map(|r| format!("{}/{}", r.kind.to_ascii_lowercase(), r.name))
                .unwrap_or_default();
            cells.push(("TYPE", enum_name(spec.r#type().as_str_name())));
            cells.push(("REASON", spec.reason.clone()));
            cells.push(("OBJECT", involved));
            cells.push(("MESSAGE", spec.message.clone()));
        }
        Object::Lease(o) => {
            let spec = or_default(&o.spec);
            cells.push(("HOLDER", spec.holder_identity.clone()));
            cells.push(("DURATION", number(spec.lease_duration_seconds)));
        }
        Object::IPAddress(o) => {
            let spec = or_default(&o.spec);
            cells.push(("ADDRESS", spec.address.clone()));
            cells.push(("SUBNET", spec.subnet.clone()));
            cells.push(("OWNER", owner(o.metadata.as_ref())));
        }
        Object::MACAddress(o) => {
            let spec = or_default(&o.spec);
            cells.push(("ADDRESS", spec.address.clone()));
            cells.push(("OWNER", owner(o.metadata.as_ref())));
        }
        Object::SegmentID(o) => {
            let spec = or_default(&o.spec);
            cells.push(("ID", number(spec.id)));
            cells.push(("OWNER", owner(o.metadata.as_ref())));
        }
    }
    if wide {
        cells.extend(wide_cells);
    }
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_status_is_the_reason_that_holds_it_else_its_phase() {
        use v1::server_status::Phase;
        let status = |phase: Phase, ready: Option<(i32, &str)>| v1::ServerStatus {
            phase: phase as i32,
            conditions: ready
                .map(|(status, reason)| v1::Condition {
                    r#type: "Ready".into(),
                    status,
                    reason: reason.into(),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let (t, f) = (
            v1::condition::Status::True as i32,
            v1::condition::Status::False as i32,
        );
        for (status, shown) in [
            (status(Phase::Pending, None), "Pending"),
            (
                status(Phase::Pending, Some((f, "FlavorNotFound"))),
                "FlavorNotFound",
            ),
            (
                status(Phase::Pending, Some((f, "NoValidHost"))),
                "NoValidHost",
            ),
            (status(Phase::Pending, Some((f, "Unscheduled"))), "Pending"),
            (status(Phase::Building, Some((f, "Building"))), "Building"),
            (
                status(Phase::Building, Some((f, "ImageNotFound"))),
                "ImageNotFound",
            ),
            (status(Phase::Running, Some((t, "Running"))), "Running"),
            (status(Phase::Stopped, Some((f, "Stopped"))), "Stopped"),
            (status(Phase::Deleting, Some((f, "Deleting"))), "Deleting"),
            (
                status(Phase::Unknown, Some((f, "NodeUnreachable"))),
                "Unknown",
            ),
        ] {
            assert_eq!(server_status(&status), shown, "{status:?}");
        }
    }

    #[test]
    fn columns_are_aligned_and_empty_cells_say_none() {
        let flavor = |name: &str, vcpus, ram_mib| {
            Object::Flavor(v1::Flavor {
                metadata: Some(v1::ObjectMeta {
                    name: name.into(),
                    ..Default::default()
                }),
                spec: Some(v1::FlavorSpec {
                    vcpus,
                    ram_mib,
                    disk_gib: 20,
                    ..Default::default()
                }),
                status: None,
            })
        };
        let out = render(
            &[flavor("m1.tiny", 1, 512), flavor("m1.large", 4, 8192)],
            false,
            false,
        );
        assert_eq!(
            out,
            "NAME       VCPUS   RAM     DISK   AGE\n\
             m1.tiny    1       512Mi   20Gi   <none>\n\
             m1.large   4       8Gi     20Gi   <none>\n"
        );
    }

    #[test]
    fn routers_and_floating_ips_show_where_they_are_and_why_not_ready() {
        let condition = |kind: &str, ok: bool, reason: &str| v1::Condition {
            r#type: kind.into(),
            status: if ok {
                v1::condition::Status::True as i32
            } else {
                v1::condition::Status::False as i32
            },
            reason: reason.into(),
            ..Default::default()
        };
        let meta = |name: &str| {
            Some(v1::ObjectMeta {
                name: name.into(),
                ..Default::default()
            })
        };
        let router = Object::Router(v1::Router {
            metadata: meta("edge"),
            spec: Some(v1::RouterSpec {
                external_gateway: Some(v1::RouterGateway {
                    network: "public".into(),
                    fixed_ip: String::new(),
                }),
                ..Default::default()
            }),
            status: Some(v1::RouterStatus {
                node: "net-1".into(),
                external_ips: vec!["203.0.113.11".into()],
                conditions: vec![condition("Ready", false, "WaitingForAgent")],
                ..Default::default()
            }),
        });
        assert_eq!(
            render(&[router], true, false),
            "NAME   GATEWAY   INTERFACES   NODE    READY   EXTERNAL-IPS   REASON            AGE\n\
             edge   public    <none>       net-1   False   203.0.113.11   WaitingForAgent   <none>\n"
        );
        let fip = Object::FloatingIP(v1::FloatingIp {
            metadata: meta("web"),
            spec: Some(v1::FloatingIpSpec {
                network: "public".into(),
                port: "web-0".into(),
                ..Default::default()
            }),
            status: Some(v1::FloatingIpStatus {
                address: "203.0.113.12".into(),
                fixed_ip: "10.0.1.5".into(),
                router: "edge".into(),
                conditions: vec![condition("Ready", true, "Plumbed")],
                ..Default::default()
            }),
        });
        let associated = v1::Condition {
            message: ferro_controllers::floatingip::associated_message(
                "10.0.1.5".parse().unwrap(),
                "web-0",
                "edge",
            ),
            ..condition("Associated", true, "Associated")
        };
        let on_server = Object::FloatingIP(v1::FloatingIp {
            metadata: meta("db"),
            spec: Some(v1::FloatingIpSpec {
                network: "public".into(),
                server: "web".into(),
                ..Default::default()
            }),
            status: Some(v1::FloatingIpStatus {
                address: "203.0.113.13".into(),
                fixed_ip: "10.0.1.5".into(),
                router: "edge".into(),
                conditions: vec![associated, condition("Ready", true, "Plumbed")],
                ..Default::default()
            }),
        });
        // A server's floating IP shows the port the controller chose.
        assert_eq!(
            render(&[fip, on_server], true, false),
            "NAME   ADDRESS        NETWORK   TARGET       FIXED-IP   READY   PORT     ROUTER   REASON   AGE\n\
             web    203.0.113.12   public    port/web-0   10.0.1.5   True    <none>   edge     <none>   <none>\n\
             db     203.0.113.13   public    server/web   10.0.1.5   True    web-0    edge     <none>   <none>\n"
        );
    }

    #[test]
    fn sizes_read_like_kubectl() {
        assert_eq!(bytes(5), "5B");
        assert_eq!(bytes(1536 * 1024 * 1024), "1.5Gi");
        assert_eq!(bytes(300 * 1024 * 1024), "300Mi");
        assert_eq!(mebibytes(2048), "2Gi");
    }
}
