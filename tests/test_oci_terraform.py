"""deploy/oci, checked without a cloud account or a terraform binary.

python-hcl2 parses the files; checkov scans them (from its own venv, `.venv-checkov`, which
`make test` builds: its pins clash with pytest's); and the user data's edits are applied to
cloud-init.yaml as Terraform's replace() applies them (RE2 patterns that Python's re reads
alike), so the test sees the very file a node boots with.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest

from gguf_appliance.sources import parse_source

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "deploy" / "oci"
CHECKOV = Path(os.environ.get("CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
# OCI refuses instance metadata (user data included, base64-encoded) over 32,000 bytes.
METADATA_LIMIT = 32_000


def parse_module(module: Path = MODULE) -> dict[str, Any]:
    """Every .tf file of the module, merged: {block type: [blocks]}."""
    merged: dict[str, list[Any]] = {}
    for path in sorted(module.glob("*.tf")):
        with path.open() as file:
            for kind, blocks in hcl2.load(file).items():
                merged.setdefault(kind, []).extend(blocks)
    return merged


def unquote(name: str) -> str:
    return name.strip('"')


def hcl_string(raw: str) -> str:
    """A string literal as python-hcl2 returns it (quotes and escapes kept) to its value."""
    assert raw.startswith('"') and raw.endswith('"'), raw
    value: str = json.loads(raw)  # HCL's escapes (\\ \" \n \t \uNNNN) are JSON's
    return value


def resources(tf: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    found = {}
    for block in tf.get("resource", []):
        for rtype, named in block.items():
            if unquote(rtype) == kind:
                found.update({unquote(n): body for n, body in named.items()})
    return found


def variables(tf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {unquote(n): body for block in tf["variable"] for n, body in block.items()}


def default(tf: dict[str, Any], name: str) -> Any:
    value = variables(tf)[name]["default"]
    return hcl_string(value) if isinstance(value, str) else value


def locals_(tf: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for block in tf["locals"]:
        merged.update({k: v for k, v in block.items() if not k.startswith("__")})
    return merged


def compact(expression: str) -> str:
    return re.sub(r"\s+", "", expression)


def apply_edits(text: str, edits: dict[str, Any], values: dict[str, str]) -> str:
    """Terraform's replace() of each edit's pattern by its text, for the given variable (and
    local) values."""
    for edit in edits.values():
        pattern = hcl_string(edit["pattern"])
        assert pattern.startswith("/") and pattern.endswith("/"), "replace() needs /regex/"
        replacement = re.sub(
            r"\$\{(?:var|local)\.(\w+)\}", lambda m: values[m[1]], hcl_string(edit["text"])
        )
        assert "${" not in replacement and "$" not in replacement
        text = re.sub(pattern[1:-1], lambda _m, r=replacement: r, text)
    return text


def render_user_data(tf: dict[str, Any], values: dict[str, str], *, builder: bool = False) -> str:
    """locals.user_data (the nodes') or locals.builder_user_data as Terraform computes them."""
    local = locals_(tf)
    image = apply_edits((ROOT / "cloud-init.yaml").read_text(), local["image_edits"], values)
    if builder:
        return apply_edits(image, {"bake": local["bake_edit"]}, values)
    return apply_edits(image, local["node_edits"], values)


@pytest.fixture(scope="module")
def tf() -> dict[str, Any]:
    return parse_module()


def test_every_variable_is_documented_typed_and_used(tf: dict[str, Any]) -> None:
    sources = "\n".join(p.read_text() for p in MODULE.glob("*.tf"))
    declared = variables(tf)
    assert len(declared) >= 20
    for name, body in declared.items():
        assert len(hcl_string(body.get("description", '""'))) > 20, f"{name}: no description"
        assert "type" in body, f"{name}: no type"
        assert f"var.{name}" in sources.replace(f'variable "{name}"', ""), f"{name} is unused"
    readme = (MODULE / "README.md").read_text()
    for name in declared:
        assert f"`{name}`" in readme, f"deploy/oci/README.md does not list {name}"


def test_nodes_are_a2_flex_with_2_ocpus_and_16_gb_from_the_given_image(tf: dict[str, Any]) -> None:
    (config,) = resources(tf, "oci_core_instance_configuration").values()
    launch = config["instance_details"][0]["launch_details"][0]
    assert hcl_string(launch["shape"]) == "VM.Standard.A2.Flex"
    shape = launch["shape_config"][0]
    assert shape["ocpus"] == "${var.node_ocpus}" and default(tf, "node_ocpus") == 2
    assert shape["memory_in_gbs"] == "${var.node_memory_gbs}"
    assert default(tf, "node_memory_gbs") == 16
    assert launch["source_details"][0]["image_id"] == "${local.node_image_id}"
    assert compact(locals_(tf)["node_image_id"]) == (
        "${var.boot_from_baked_image?one(oci_core_image.baked[*].id):var.image_ocid}"
    )
    assert "default" not in variables(tf)["image_ocid"]
    assert default(tf, "boot_from_baked_image") is True
    vnic = launch["create_vnic_details"][0]
    assert vnic["assign_public_ip"] is False
    assert launch["instance_options"][0]["are_legacy_imds_endpoints_disabled"] is True


def test_pool_spreads_over_fault_domains_behind_the_balancer(tf: dict[str, Any]) -> None:
    (pool,) = resources(tf, "oci_core_instance_pool").values()
    placement = pool["placement_configurations"][0]
    domains = [hcl_string(d) for d in placement["fault_domains"]]
    assert sorted(domains) == ["FAULT-DOMAIN-1", "FAULT-DOMAIN-2", "FAULT-DOMAIN-3"]
    assert placement["primary_vnic_subnets"][0]["subnet_id"] == "${oci_core_subnet.nodes.id}"
    balancer = pool["load_balancers"][0]
    assert balancer["backend_set_name"] == "${oci_load_balancer_backend_set.nodes.name}"
    assert balancer["port"] == 80


def test_autoscaling_on_the_nodes_load_holding_scale_in_while_streams_are_in_flight(
    tf: dict[str, Any],
) -> None:
    (scaling,) = resources(tf, "oci_autoscaling_auto_scaling_configuration").values()
    assert scaling["auto_scaling_resources"][0]["id"] == "${oci_core_instance_pool.nodes.id}"
    (policy,) = scaling["policies"]
    capacity = policy["capacity"][0]
    assert capacity["min"] == "${var.pool_min_nodes}"
    assert capacity["max"] == "${var.pool_max_nodes}"
    rules = {hcl_string(r["display_name"]): r for r in policy["rules"]}
    out, shrink = rules["scale-out"], rules["scale-in"]
    assert out["action"][0]["value"] == 1
    assert shrink["action"][0]["value"] == -1
    for rule in (out, shrink):
        metric = rule["metric"][0]
        assert hcl_string(metric["metric_source"]) == "CUSTOM_QUERY"
        assert metric["namespace"] == "${var.metrics_namespace}"
    # The metrics the nodes post (gguf_appliance.oci_metrics), for this pool only.
    grow = hcl_string(out["metric"][0]["query"])
    assert grow.startswith('busy_slot_ratio[1m]{pool = "${var.name}"}.grouping().mean() > ')
    assert "${var.scale_out_busy_ratio}" in grow and "queue_depth[1m]" in grow
    # Scale-in only when no node has a stream in flight or a request queued.
    held = hcl_string(shrink["metric"][0]["query"])
    assert held == (
        'busy_slots[1m]{pool = "${var.name}"}.grouping().max() < 1 && '
        'queue_depth[1m]{pool = "${var.name}"}.grouping().max() < 1'
    )
    assert hcl_string(shrink["metric"][0]["pending_duration"]) == "PT${var.scale_in_idle_minutes}M"
    assert default(tf, "pool_min_nodes") <= default(tf, "pool_max_nodes")


def test_nodes_may_post_only_their_namespace_and_read_only_their_secrets(
    tf: dict[str, Any],
) -> None:
    (group,) = resources(tf, "oci_identity_dynamic_group").values()
    assert "${var.compartment_ocid}" in group["matching_rule"]
    assert "tag.${oci_identity_tag_namespace.pool.name}" in group["matching_rule"]
    (config,) = resources(tf, "oci_core_instance_configuration").values()
    tags = config["instance_details"][0]["launch_details"][0]["defined_tags"]
    assert list(tags.values()) == ["${var.name}"]
    (policy,) = resources(tf, "oci_identity_policy").values()
    statements = compact(policy["statements"])
    assert "tousemetricsincompartmentid${var.compartment_ocid}" in statements
    assert "wheretarget.metrics.namespace='${var.metrics_namespace}'" in statements
    assert "toreadsecret-bundlesintenancywheretarget.secret.id='${id}'" in statements
    assert "manage" not in statements and "secret-family" not in statements


def test_balancer_checks_ready_expecting_200_and_keeps_long_streams(tf: dict[str, Any]) -> None:
    (balancer,) = resources(tf, "oci_load_balancer_load_balancer").values()
    assert hcl_string(balancer["shape"]) == "flexible"
    assert balancer["is_private"] is False
    (backend_set,) = resources(tf, "oci_load_balancer_backend_set").values()
    check = backend_set["health_checker"][0]
    assert hcl_string(check["protocol"]) == "HTTP"
    assert hcl_string(check["url_path"]) == "/health/ready"
    assert check["return_code"] == 200
    assert check["interval_ms"] == "${var.health_check_interval_ms}"
    assert check["timeout_in_millis"] == "${var.health_check_timeout_ms}"
    assert check["retries"] == "${var.health_check_retries}"
    listeners = resources(tf, "oci_load_balancer_listener")
    for listener in listeners.values():
        idle = listener["connection_configuration"][0]["idle_timeout_in_seconds"]
        assert idle == "${var.listener_idle_timeout_seconds}"
    assert default(tf, "listener_idle_timeout_seconds") >= 300


def test_nodes_take_port_80_from_the_balancer_only(tf: dict[str, Any]) -> None:
    rules = resources(tf, "oci_core_network_security_group_security_rule")
    to_nodes = [
        r
        for r in rules.values()
        if r["network_security_group_id"] == "${oci_core_network_security_group.nodes.id}"
        and hcl_string(r["direction"]) == "INGRESS"
    ]
    assert len(to_nodes) == 1
    (rule,) = to_nodes
    assert rule["source"] == "${oci_core_network_security_group.lb.id}"
    assert hcl_string(rule["source_type"]) == "NETWORK_SECURITY_GROUP"
    ports = rule["tcp_options"][0]["destination_port_range"][0]
    assert ports["min"] == ports["max"] == 80
    subnets = resources(tf, "oci_core_subnet")
    assert subnets["nodes"]["prohibit_public_ip_on_vnic"] is True
    assert subnets["lb"]["prohibit_public_ip_on_vnic"] is False
    # The VCN's default security list (used by both subnets) lets nothing in but ICMP 3/4.
    (default_list,) = resources(tf, "oci_core_default_security_list").values()
    assert [hcl_string(r["protocol"]) for r in default_list["ingress_security_rules"]] == ["1"]


DIGEST = hashlib.sha256(b"a key of the operator's own making").hexdigest()
OCI_VALUES = {
    "compartment_ocid": "ocid1.compartment.oc1..pool",
    "metrics_namespace": "gguf_appliance",
    "name": "gguf-appliance",
    "api_key_secrets_line": "ocid1.vaultsecret.oc1..a,ocid1.vaultsecret.oc1..b",
    "hf_token_secret": "",
}
OCI_BLOCK = (
    "      GGUF_APPLIANCE_OCI_METRICS_COMPARTMENT=ocid1.compartment.oc1..pool\n"
    "      GGUF_APPLIANCE_OCI_METRICS_NAMESPACE=gguf_appliance\n"
    "      GGUF_APPLIANCE_OCI_METRICS_POOL=gguf-appliance\n"
    "      GGUF_APPLIANCE_OCI_API_KEY_SECRETS=ocid1.vaultsecret.oc1..a,ocid1.vaultsecret.oc1..b\n"
    "      GGUF_APPLIANCE_OCI_HF_TOKEN_SECRET=\n"
)


def without_oci_block(rendered: str) -> str:
    """The rendered user data with the OCI settings (where each node posts its load, which
    secrets it reads) put back to cloud-init.yaml's marker line, after checking them."""
    assert rendered.count(OCI_BLOCK) == 1, rendered
    return rendered.replace(OCI_BLOCK, "      # OCI settings: deploy/oci sets them here.\n")


def test_user_data_is_the_repository_cloud_init_with_four_lines_set(tf: dict[str, Any]) -> None:
    local = locals_(tf)
    path = hcl_string(local["cloud_init_path"]).replace("${path.module}", str(MODULE))
    assert Path(path).resolve() == ROOT / "cloud-init.yaml"

    # image_user_data = replace(...(file(cloud_init_path), each image edit)...), in order; the
    # nodes' user_data is that with each node edit; the builder's, that with the bake switch.
    def nested(start: str, group: str) -> str:
        for key in local[group]:
            edit = f"local.{group}.{key}"
            start = f"replace({start},{edit}.pattern,{edit}.text)"
        return "${" + start + "}"

    assert compact(local["image_user_data"]) == nested("file(local.cloud_init_path)", "image_edits")
    assert compact(local["user_data"]) == nested("local.image_user_data", "node_edits")
    assert compact(local["builder_user_data"]) == (
        "${replace(local.image_user_data,local.bake_edit.pattern,local.bake_edit.text)}"
    )
    (config,) = resources(tf, "oci_core_instance_configuration").values()
    metadata = config["instance_details"][0]["launch_details"][0]["metadata"]
    assert metadata["user_data"] == "${base64encode(local.user_data)}"

    cloud_init = (ROOT / "cloud-init.yaml").read_text()
    edits = {**local["image_edits"], **local["node_edits"], "bake": local["bake_edit"]}
    for key, edit in edits.items():
        found = re.findall(hcl_string(edit["pattern"])[1:-1], cloud_init)
        assert len(found) == edit["count"], f"{key}: {found}"

    # With the defaults: cloud-init.yaml itself, but for the balancer's subnet and the digest of
    # the key Terraform made.
    defaults = {
        "model_source": default(tf, "model"),
        "model_sha256_line": "#GGUF_APPLIANCE_MODEL_SHA256=",
        "appliance_version": default(tf, "appliance_version"),
        "lb_subnet_cidr": default(tf, "lb_subnet_cidr"),
        "api_key_sha256s_line": DIGEST,
        **OCI_VALUES,
    }
    assert defaults["appliance_version"] == importlib.metadata.version("gguf-appliance")
    rendered = without_oci_block(render_user_data(tf, defaults))
    changed = [
        (a, b)
        for a, b in zip(cloud_init.splitlines(), rendered.splitlines(), strict=True)
        if a != b
    ]
    assert changed == [
        ("      LB_SUBNET=10.0.0.0/16", "      LB_SUBNET=10.0.1.0/24"),
        ("      API_KEY_SHA256S=", f"      API_KEY_SHA256S={DIGEST}"),
    ]

    # With other values: exactly the model and its sha256, the two version lines, the subnet and
    # the digests.
    sha = hashlib.sha256(b"a model").hexdigest()
    chosen = {
        "model_source": "hf://acme/smol-GGUF/smol.Q4_0.gguf@main",
        "model_sha256_line": f"GGUF_APPLIANCE_MODEL_SHA256={sha}",
        "appliance_version": "0.2.1",
        "lb_subnet_cidr": "10.9.1.0/24",
        "api_key_sha256s_line": f"{DIGEST},{DIGEST[::-1]}",
        **OCI_VALUES,
    }
    rendered = without_oci_block(render_user_data(tf, chosen))
    assert len(rendered.splitlines()) == len(cloud_init.splitlines())
    changed_lines = [
        b.strip()
        for a, b in zip(cloud_init.splitlines(), rendered.splitlines(), strict=True)
        if a != b
    ]
    assert changed_lines == [
        "GGUF_APPLIANCE_MODEL=hf://acme/smol-GGUF/smol.Q4_0.gguf@main",
        f"GGUF_APPLIANCE_MODEL_SHA256={sha}",
        "GGUF_APPLIANCE_PACKAGE=gguf-appliance==0.2.1",
        "LB_SUBNET=10.9.1.0/24",
        f"API_KEY_SHA256S={DIGEST},{DIGEST[::-1]}",
        "gguf-appliance==0.2.1",
    ]
    assert len(base64.b64encode(rendered.encode())) < METADATA_LIMIT

    # The builder's: the same image lines, the bake switch on, and nothing of any node's own
    # (no key digest, no Vault secret, no metrics settings: the seal leaves none in the image).
    built = render_user_data(tf, chosen, builder=True)
    changed_lines = [
        b.strip()
        for a, b in zip(cloud_init.splitlines(), built.splitlines(), strict=True)
        if a != b
    ]
    assert changed_lines == [
        "GGUF_APPLIANCE_MODEL=hf://acme/smol-GGUF/smol.Q4_0.gguf@main",
        f"GGUF_APPLIANCE_MODEL_SHA256={sha}",
        "GGUF_APPLIANCE_BAKE=yes",
        "GGUF_APPLIANCE_PACKAGE=gguf-appliance==0.2.1",
        "gguf-appliance==0.2.1",
    ]


def test_rendered_user_data_passes_the_cloud_init_schema(
    tf: dict[str, Any], tmp_path: Path
) -> None:
    rendered = tmp_path / "user-data.yaml"
    rendered.write_text(
        render_user_data(
            tf,
            {
                "model_source": "https://objectstorage.eu-frankfurt-1.oraclecloud.com/p/Tk-3_x/n/ns/b/models/o/model.gguf",
                "model_sha256_line": f"GGUF_APPLIANCE_MODEL_SHA256={DIGEST}",
                "appliance_version": "0.1.0",
                "lb_subnet_cidr": "10.0.1.0/24",
                "api_key_sha256s_line": DIGEST,
                **OCI_VALUES,
            },
        )
    )
    result = subprocess.run(
        ["cloud-init", "schema", "-c", str(rendered)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_variable_validations_guard_the_user_data(tf: dict[str, Any]) -> None:
    # What becomes a line of the user data may not break it: no white space, no '$'.
    (check,) = variables(tf)["model"]["validation"]
    pattern = re.search(r'regex\("(.*)",var\.model\)', compact(check["condition"]))
    assert pattern
    model_re = json.loads(f'"{pattern[1]}"')
    assert re.fullmatch(model_re, default(tf, "model"))
    for bad in ("hf://a/b.gguf\nGGUF_APPLIANCE_API_KEYS=", "hf://a/$1.gguf", "ftp://x/y.gguf"):
        assert not re.fullmatch(model_re, bad), bad


def test_nodes_need_an_api_key_and_the_user_data_holds_only_its_digest(
    tf: dict[str, Any],
) -> None:
    # No digests given: Terraform makes one key, shows it as a sensitive output, and sends the
    # nodes its SHA-256 alone; digests given: those, and no key is made.
    (made,) = resources(tf, "random_password").values()
    assert compact(made["count"]) == (
        "${length(var.api_key_sha256s)==0&&length(var.api_key_secret_ocids)==0?1:0}"
    )
    assert made["length"] >= 32
    local = locals_(tf)
    assert compact(local["api_key_sha256s"]) == (
        "${concat(var.api_key_sha256s,[forkeyinrandom_password.api_key:sha256(key.result)])}"
    )
    assert compact(local["api_key_sha256s_line"]) == '${join(",",local.api_key_sha256s)}'
    edit = local["node_edits"]["api_keys"]
    assert hcl_string(edit["text"]) == "API_KEY_SHA256S=${local.api_key_sha256s_line}"
    assert default(tf, "api_key_sha256s") == []
    outputs = {unquote(n): body for block in tf["output"] for n, body in block.items()}
    assert outputs["api_key"]["sensitive"] is True
    assert compact(outputs["api_key"]["value"]) == "${one(random_password.api_key[*].result)}"
    # Nothing but these goes into the user data: no key, only the digests.
    edits = {**local["image_edits"], **local["node_edits"], "bake": local["bake_edit"]}
    texts = " ".join(hcl_string(e["text"]) for e in edits.values())
    assert set(re.findall(r"\$\{([^}]*)\}", texts)) == {
        "local.model_source",
        "local.model_sha256_line",
        "var.appliance_version",
        "var.lb_subnet_cidr",
        "local.api_key_sha256s_line",
        # Where to post the load, which secrets to read: OCIDs and names, never a secret.
        "var.compartment_ocid",
        "var.metrics_namespace",
        "var.name",
        "local.api_key_secrets_line",
        "local.hf_token_secret",
    }

    (check,) = variables(tf)["api_key_sha256s"]["validation"]
    pattern = re.search(r'regex\("(.*)",d\)', compact(check["condition"]))
    assert pattern
    digest_re = json.loads(f'"{pattern[1]}"')
    assert re.fullmatch(digest_re, DIGEST)
    for bad in (DIGEST.upper(), DIGEST[:-1], "a key, not its digest", DIGEST + "\nX=1"):
        assert not re.fullmatch(digest_re, bad), bad


def test_a_builder_bakes_the_image_the_pool_boots_once_it_has_powered_off(
    tf: dict[str, Any],
) -> None:
    (builder,) = resources(tf, "oci_core_instance").values()
    assert compact(builder["count"]) == "${var.boot_from_baked_image?1:0}"
    (config,) = resources(tf, "oci_core_instance_configuration").values()
    launch = config["instance_details"][0]["launch_details"][0]
    # The nodes' shape and size (llama.cpp is compiled for the builder's CPU), the stock image.
    assert builder["shape"] == launch["shape"]
    assert builder["shape_config"] == launch["shape_config"]
    assert builder["source_details"][0]["source_id"] == "${var.image_ocid}"
    assert builder["metadata"]["user_data"] == "${base64encode(local.builder_user_data)}"
    # Private, out through the NAT gateway, and not one of the pool's nodes to OCI's IAM.
    vnic = builder["create_vnic_details"][0]
    assert vnic["subnet_id"] == "${oci_core_subnet.nodes.id}"
    assert vnic["assign_public_ip"] is False
    assert "defined_tags" not in builder
    assert builder["instance_options"][0]["are_legacy_imds_endpoints_disabled"] is True
    # A new version, model or base image replaces the builder: a new bake, a new image.
    inputs = resources(tf, "terraform_data")["image_inputs"]["input"]
    assert compact(inputs["user_data"]) == "${sha256(local.builder_user_data)}"
    assert inputs["base_image"] == "${var.image_ocid}"
    assert builder["lifecycle"][0]["replace_triggered_by"] == [
        "${terraform_data.image_inputs[count.index]}"
    ]

    # The image is taken once the bake has powered the builder off, waited for within bounds.
    waited = resources(tf, "terraform_data")["bake_finished"]
    assert waited["triggers_replace"] == ["${oci_core_instance.builder[count.index].id}"]
    command = hcl_string(waited["provisioner"][0]['"local-exec"']["command"])
    assert command.startswith("oci compute instance get --instance-id ${oci_core_instance")
    assert "--wait-for-state STOPPED" in command
    assert "--max-wait-seconds ${var.bake_timeout_minutes * 60}" in command
    (image,) = resources(tf, "oci_core_image").values()
    assert image["instance_id"] == "${oci_core_instance.builder[count.index].id}"
    assert image["depends_on"] == ["${terraform_data.bake_finished}"]
    assert image["lifecycle"][0]["create_before_destroy"] is True


def test_the_model_bucket_is_private_and_read_through_a_read_only_par_with_a_pinned_sha256(
    tf: dict[str, Any],
) -> None:
    (bucket,) = resources(tf, "oci_objectstorage_bucket").values()
    assert compact(bucket["count"]) == "${var.model_file==null?0:1}"
    assert hcl_string(bucket["access_type"]) == "NoPublicAccess"
    (model,) = resources(tf, "oci_objectstorage_object").values()
    assert model["source"] == "${var.model_file}"
    (par,) = resources(tf, "oci_objectstorage_preauthrequest").values()
    assert hcl_string(par["access_type"]) == "ObjectRead"  # one object, read only
    assert par["object"] == "${oci_objectstorage_object.model[0].object}"
    assert par["time_expires"] == "${var.model_par_expires}"
    local = locals_(tf)
    assert compact(local["model_source"]) == (
        '${var.model_file==null?var.model:"https://objectstorage.${var.region}.oraclecloud.com'
        '${one(oci_objectstorage_preauthrequest.model[*].access_uri)}"}'
    )
    assert compact(local["model_sha256_line"]) == (
        '${var.model_sha256==null?"#GGUF_APPLIANCE_MODEL_SHA256=":'
        '"GGUF_APPLIANCE_MODEL_SHA256=${var.model_sha256}"}'
    )
    # A bucket model needs its pin and its request's expiry; a pin is 64 hex digits.
    (needs,) = variables(tf)["model_file"]["validation"]
    assert "var.model_sha256!=null" in compact(needs["condition"])
    assert "var.model_par_expires!=null" in compact(needs["condition"])
    (check,) = variables(tf)["model_sha256"]["validation"]
    pattern = re.search(r'regex\("(.*)",var\.model_sha256\)', compact(check["condition"]))
    assert pattern
    sha_re = json.loads(f'"{pattern[1]}"')
    assert re.fullmatch(sha_re, DIGEST)
    for bad in (DIGEST.upper(), DIGEST[:-1], DIGEST + "\nGGUF_APPLIANCE_OPEN_API=true"):
        assert not re.fullmatch(sha_re, bad), bad
    # What the node then fetches is a URL it accepts: https, naming the .gguf object.
    url = "https://objectstorage.eu-frankfurt-1.oraclecloud.com/p/Tk-3_x/n/ns/b/m/o/model.gguf"
    assert parse_source(url).kind == "url"


def test_with_a_certificate_port_80_only_redirects_to_https(tf: dict[str, Any]) -> None:
    (rule_set,) = resources(tf, "oci_load_balancer_rule_set").values()
    assert compact(rule_set["count"]) == "${var.certificate_ocid==null?0:1}"
    (rule,) = rule_set["items"]
    assert hcl_string(rule["action"]) == "REDIRECT"
    (condition,) = rule["conditions"]
    assert hcl_string(condition["attribute_name"]) == "PATH"
    assert hcl_string(condition["attribute_value"]) == "/"  # every path
    assert hcl_string(condition["operator"]) == "FORCE_LONGEST_PREFIX_MATCH"
    (target,) = rule["redirect_uri"]
    assert hcl_string(target["protocol"]) == "HTTPS" and target["port"] == 443
    assert [hcl_string(target[k]) for k in ("host", "path", "query")] == [
        "{host}",
        "{path}",
        "{query}",
    ]
    assert rule["response_code"] in (301, 308)
    listeners = resources(tf, "oci_load_balancer_listener")
    http = listeners["http"]
    assert http["port"] == 80
    assert http["rule_set_names"] == "${oci_load_balancer_rule_set.https_redirect[*].name}"
    https = listeners["https"]
    assert compact(https["count"]) == "${var.certificate_ocid==null?0:1}"
    assert "rule_set_names" not in https
    assert https["ssl_configuration"][0]["certificate_ids"] == ["${var.certificate_ocid}"]


def run_checkov(module: Path) -> dict[str, Any]:
    assert CHECKOV.exists(), f"{CHECKOV} is missing: `make test` builds it (or `make checkov`)"
    result = subprocess.run(
        [
            str(CHECKOV),
            *("-d", str(module), "--framework", "terraform"),
            *("--skip-download", "--compact", "-o", "json"),
        ],
        capture_output=True,
        text=True,
        # No network: no Prisma Cloud download, no update check against PyPI.
        env={**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"},
        timeout=120,
    )
    assert result.returncode in (0, 1), result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_checkov_finds_nothing_and_every_skip_says_why() -> None:
    report = run_checkov(MODULE)
    results = report["results"]
    assert results["failed_checks"] == [], [
        (c["check_id"], c["resource"]) for c in results["failed_checks"]
    ]
    assert results["parsing_errors"] == []
    assert report["summary"]["resource_count"] >= 20
    assert len(results["passed_checks"]) >= 5
    for skipped in results["skipped_checks"]:
        reason = skipped["check_result"].get("suppress_comment", "")
        assert len(reason) > 30, f"{skipped['check_id']} on {skipped['resource']}: no reason"


def test_checkov_would_catch_ssh_open_to_the_world(tmp_path: Path) -> None:
    # The scan is live: the same module with SSH open to everyone fails it.
    module = tmp_path / "oci"
    shutil.copytree(MODULE, module)
    (module / "ssh.tf").write_text(
        'resource "oci_core_network_security_group_security_rule" "ssh" {\n'
        "  network_security_group_id = oci_core_network_security_group.nodes.id\n"
        '  direction = "INGRESS"\n'
        '  protocol  = "6"\n'
        '  source    = "0.0.0.0/0"\n'
        "  tcp_options {\n"
        "    destination_port_range {\n"
        "      min = 22\n"
        "      max = 22\n"
        "    }\n"
        "  }\n"
        "}\n"
    )
    failed = run_checkov(module)["results"]["failed_checks"]
    assert "CKV_OCI_22" in {c["check_id"] for c in failed}


def test_output_is_the_balancers_public_address(tf: dict[str, Any]) -> None:
    outputs = {unquote(n): body for block in tf["output"] for n, body in block.items()}
    value = compact(outputs["load_balancer_ip"]["value"])
    assert "oci_load_balancer_load_balancer.pool.ip_address_details" in value
    assert "ifip.is_public" in value
