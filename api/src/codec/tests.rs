use super::*;
use crate::v1;

fn decode_one(text: &str) -> Result<Object, CodecError> {
    let mut objects = decode_yaml(text)?;
    assert_eq!(objects.len(), 1);
    Ok(objects.remove(0))
}

fn error_of(text: &str) -> String {
    decode_one(text)
        .expect_err("the document is invalid")
        .to_string()
}

const SERVER: &str = "\
apiVersion: ferro/v1
kind: Server
metadata:
  name: web-1
  labels:
    app: web
spec:
  flavor: m1.small
  image: debian-12
  networks:
    - network: private
      fixedIp: 10.0.1.10
  powerState: Stopped
";

#[test]
fn decodes_camel_case_fields_and_enums() {
    let Object::Server(server) = decode_one(SERVER).unwrap() else {
        panic!("not a server")
    };
    let spec = server.spec.unwrap();
    assert_eq!(spec.flavor, "m1.small");
    assert_eq!(spec.networks[0].fixed_ip, "10.0.1.10");
    assert_eq!(
        spec.power_state,
        Some(v1::server_spec::PowerState::Stopped as i32)
    );
    assert_eq!(
        spec.run_strategy, None,
        "an omitted optional scalar stays unset"
    );
    assert_eq!(server.metadata.unwrap().labels["app"], "web");
}

#[test]
fn round_trips_through_yaml() {
    let object = decode_one(SERVER).unwrap();
    let yaml = to_yaml(std::slice::from_ref(&object));
    assert_eq!(decode_one(&yaml).unwrap(), object);
    assert!(
        yaml.starts_with("apiVersion: ferro/v1\nkind: Server\nmetadata:"),
        "{yaml}"
    );
}

#[test]
fn unknown_field_is_named_with_its_path_and_position() {
    let text = SERVER.replace("fixedIp", "fixedIP");
    let err = error_of(&text);
    assert_eq!(
        err,
        "12:16: servers/web-1: spec.networks[0].fixedIP: unknown field; did you mean `fixedIp`?"
    );
}

#[test]
fn snake_case_names_point_to_the_camel_case_spelling() {
    let err = error_of(&SERVER.replace("fixedIp", "fixed_ip"));
    assert!(
        err.ends_with("spec.networks[0].fixed_ip: unknown field; did you mean `fixedIp`?"),
        "{err}"
    );
}

#[test]
fn mistyped_field_is_named() {
    let err = error_of(&SERVER.replace("flavor: m1.small", "flavor: [m1]"));
    assert!(
        err.contains("spec.flavor: expected a string, found a list"),
        "{err}"
    );
}

#[test]
fn enum_values_are_case_sensitive() {
    let err = error_of(&SERVER.replace("powerState: Stopped", "powerState: stopped"));
    assert!(
        err.contains(
            "spec.powerState: `stopped` is not one of Running, Stopped (spelled `Stopped`)"
        ),
        "{err}"
    );
    let err =
        error_of(&SERVER.replace("powerState: Stopped", "powerState: POWER_STATE_UNSPECIFIED"));
    assert!(err.contains("is not one of Running, Stopped"), "{err}");
}

#[test]
fn integers_are_plain_numbers() {
    let flavor = "apiVersion: ferro/v1\nkind: Flavor\nmetadata: {name: m1.tiny}\nspec: {vcpus: 1, ramMib: 512, diskGib: 1}\n";
    let object = decode_one(flavor).unwrap();
    let json = encode_object(&object);
    assert_eq!(json["spec"]["ramMib"], serde_json::json!(512));
    let err = error_of(&flavor.replace("ramMib: 512", "ramMib: \"512\""));
    assert!(
        err.contains("spec.ramMib: expected an integer, found a string"),
        "{err}"
    );
    let err = error_of(&flavor.replace("ramMib: 512", "ramMib: 1.5"));
    assert!(
        err.contains("spec.ramMib: expected an integer, found a number"),
        "{err}"
    );
    let err = error_of(&flavor.replace("vcpus: 1", "vcpus: -1"));
    assert!(err.contains("spec.vcpus: -1 is out of range"), "{err}");
}

#[test]
fn explicit_false_keeps_its_presence() {
    let net = "apiVersion: ferro/v1\nkind: Network\nmetadata: {name: n}\nspec:\n  subnets:\n  - {name: a, cidr: 10.0.0.0/24, dhcp: false}\n";
    let object = decode_one(net).unwrap();
    let Object::Network(n) = &object else {
        panic!()
    };
    assert_eq!(n.spec.as_ref().unwrap().subnets[0].dhcp, Some(false));
    let yaml = to_yaml(std::slice::from_ref(&object));
    assert!(yaml.contains("dhcp: false"), "{yaml}");
}

#[test]
fn kind_and_api_version_are_checked() {
    assert!(
        error_of("apiVersion: ferro/v1\nkind: Sever\nmetadata: {name: a}\n")
            .contains("kind: unknown kind `Sever`")
    );
    assert!(
        error_of("apiVersion: v1\nkind: Server\nmetadata: {name: a}\n")
            .contains("servers/a: apiVersion: must be `ferro/v1`")
    );
    assert!(error_of("kind: Server\nmetadata: {name: a}\n").contains("apiVersion: required"));
}

#[test]
fn syntax_errors_carry_line_and_column() {
    let err = decode_yaml("apiVersion: ferro/v1\nkind: Server\nmetadata:\n  name: [unclosed\n")
        .unwrap_err();
    let CodecError::Syntax { position, .. } = err else {
        panic!("{err:?}")
    };
    assert!(position.line >= 4, "{position:?}");
}

#[test]
fn an_alias_bomb_is_refused_early_and_large_real_manifests_are_not() {
    let mut bomb = String::from("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for (name, previous) in ["b", "c", "d", "e", "f", "g", "h", "i"]
        .iter()
        .zip("abcdefgh".chars())
    {
        let alias = format!("*{previous}");
        bomb.push_str(&format!(
            "{name}: &{name} [{}]\n",
            vec![alias; 9].join(", ")
        ));
    }
    let begin = std::time::Instant::now();
    let err = parse_yaml(&bomb).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "too many YAML nodes (more than {}); is this a YAML bomb?",
            node_budget(&bomb)
        )
    );
    assert!(begin.elapsed() < std::time::Duration::from_secs(2));

    // Two thousand Servers, anchors and all, are a real manifest.
    let one = "---\napiVersion: ferro/v1\nkind: Server\nmetadata: {name: s, labels: &l {app: web, tier: front}}\nspec: {flavor: m1.small, image: debian-12, networks: [{network: n}]}\nx: *l\n";
    let many = one.repeat(2000);
    assert_eq!(parse_yaml(&many).unwrap().len(), 2000);
}

#[test]
fn timestamps_are_rfc3339() {
    let text = "apiVersion: ferro/v1\nkind: Lease\nmetadata: {name: controllers}\nspec: {holderIdentity: a, renewTime: \"2026-11-22T10:00:00Z\"}\n";
    let object = decode_one(text).unwrap();
    let Object::Lease(lease) = &object else {
        panic!()
    };
    assert_eq!(
        lease.spec.as_ref().unwrap().renew_time.unwrap().seconds,
        1_795_341_600
    );
    assert_eq!(
        encode_object(&object)["spec"]["renewTime"],
        "2026-11-22T10:00:00Z"
    );
    assert!(
        error_of(&text.replace("2026-11-22T10:00:00Z", "yesterday"))
            .contains("spec.renewTime: `yesterday` is not an RFC 3339 timestamp")
    );
}

#[test]
fn multiple_documents_and_empty_ones() {
    let text = format!(
        "---\n{SERVER}---\n---\n{}",
        SERVER.replace("web-1", "web-2")
    );
    let objects = decode_yaml(&text).unwrap();
    assert_eq!(
        objects.iter().map(Object::name).collect::<Vec<_>>(),
        ["web-1", "web-2"]
    );
}

#[test]
fn duplicate_keys_are_refused() {
    let text = SERVER.replace(
        "  image: debian-12\n",
        "  image: debian-12\n  image: other\n",
    );
    assert!(decode_yaml(&text).is_err());
}

#[test]
fn yaml_1_1_lookalikes_stay_strings() {
    for word in ["n", "no", "yes", "on", "off", "0755", "null-ish", "\"1e3\""] {
        let text = format!(
            "apiVersion: ferro/v1\nkind: Flavor\nmetadata: {{name: a}}\nspec: {{vcpus: 1, description: {word}}}\n"
        );
        let object = decode_one(&text).unwrap_or_else(|e| panic!("{word}: {e}"));
        let yaml = to_yaml(std::slice::from_ref(&object));
        assert_eq!(
            decode_one(&yaml).unwrap(),
            object,
            "{word} round-trips: {yaml}"
        );
    }
}

#[test]
fn numbers_for_strings_suggest_quoting() {
    let text =
        "apiVersion: ferro/v1\nkind: Flavor\nmetadata: {name: a}\nspec: {description: 1e3}\n";
    assert!(error_of(text).ends_with(
        "spec.description: expected a string, found a number (quote it to make it a string)"
    ));
}

#[test]
fn syntax_error_messages_do_not_repeat_the_position() {
    let err = decode_yaml("apiVersion: ferro/v1\nkind: [unclosed\n").unwrap_err();
    let text = err.to_string();
    assert!(!text.contains("line "), "{text}");
    assert!(
        text.starts_with(&format!("{}:", err.position().unwrap())),
        "{text}"
    );
}
