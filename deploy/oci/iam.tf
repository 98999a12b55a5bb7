# Who the nodes are to OCI: a dynamic group of the pool's instances, and the least policy that
# lets them (instance principals, no credential on the node) post their load to one metric
# namespace and read only the Vault secrets named in the variables. Dynamic groups and their
# policies live in the tenancy's root compartment (the home region): applying this module needs
# the right to manage them there.

locals {
  # The secrets the nodes read: API keys, and the Hugging Face token if there is one.
  node_secret_ocids = concat(var.api_key_secret_ocids, var.hf_token_secret_ocid == null ? [] : [var.hf_token_secret_ocid])
}

resource "oci_identity_dynamic_group" "nodes" {
  compartment_id = var.tenancy_ocid
  name           = "${var.name}-nodes"
  description    = "Instances of the ${var.name} pool (their instance configuration's compartment)."
  # Instances launched from this module's instance configuration carry its OCID.
  matching_rule = "ALL {instance.compartment.id = '${var.compartment_ocid}', tag.${oci_identity_tag_namespace.pool.name}.${oci_identity_tag.pool.name}.value = '${var.name}'}"
}

# A tag every node carries, so the dynamic group holds the pool's instances and nothing else of
# the compartment.
resource "oci_identity_tag_namespace" "pool" {
  compartment_id = var.compartment_ocid
  name           = "${replace(var.name, "-", "_")}_pool"
  description    = "Tags of the ${var.name} pool's nodes."
}

resource "oci_identity_tag" "pool" {
  tag_namespace_id = oci_identity_tag_namespace.pool.id
  name             = "member"
  description      = "The pool a node belongs to: its dynamic group matches on this."
}

resource "oci_identity_policy" "nodes" {
  compartment_id = var.tenancy_ocid
  name           = "${var.name}-nodes"
  description    = "What the ${var.name} nodes may do as themselves: post their load, read their secrets."
  statements = concat(
    [
      # Post metrics, to this namespace only (use metrics is post and read; the condition pins it).
      "Allow dynamic-group ${oci_identity_dynamic_group.nodes.name} to use metrics in compartment id ${var.compartment_ocid} where target.metrics.namespace = '${var.metrics_namespace}'",
    ],
    # Read the current version of each named secret, and no other secret.
    [for id in local.node_secret_ocids : "Allow dynamic-group ${oci_identity_dynamic_group.nodes.name} to read secret-bundles in tenancy where target.secret.id = '${id}'"],
  )
}
