# The nodes: one instance configuration (shape, image, network, user data), a pool of it spread
# over the availability domain's fault domains, and autoscaling on the nodes' load (custom
# metrics they post, docs/oci-scaling.md) between min and max.

data "oci_identity_availability_domains" "region" {
  compartment_id = var.compartment_ocid
}

# The API key, when the operator gives no digests: kept in the Terraform state (treat the state
# as a secret), shown by `terraform output -raw api_key`; only its SHA-256 goes to the nodes.
resource "random_password" "api_key" {
  count   = length(var.api_key_sha256s) == 0 && length(var.api_key_secret_ocids) == 0 ? 1 : 0
  length  = 43
  special = false
}

locals {
  availability_domain = data.oci_identity_availability_domains.region.availability_domains[var.availability_domain_number - 1].name

  # The keys every node accepts, as the digests cloud-init.yaml writes to its key file: the
  # operator's, or else the one made above.
  api_key_sha256s      = concat(var.api_key_sha256s, [for key in random_password.api_key : sha256(key.result)])
  api_key_sha256s_line = join(",", local.api_key_sha256s)
  api_key_secrets_line = join(",", var.api_key_secret_ocids)
  hf_token_secret      = var.hf_token_secret_ocid == null ? "" : var.hf_token_secret_ocid

  # The model the nodes and the builder fetch: the bucket's object through its read-only
  # pre-authenticated request (bucket.tf), or else var.model; its sha256 pinned when given.
  model_source      = var.model_file == null ? var.model : "https://objectstorage.${var.region}.oraclecloud.com${one(oci_objectstorage_preauthrequest.model[*].access_uri)}"
  model_sha256_line = var.model_sha256 == null ? "#GGUF_APPLIANCE_MODEL_SHA256=" : "GGUF_APPLIANCE_MODEL_SHA256=${var.model_sha256}"

  # The user data is the repository's cloud-init.yaml, with the lines below set from the
  # variables. Each pattern is an RE2 expression (slashes make replace() read it as one) that
  # tests/test_oci_terraform.py finds in cloud-init.yaml exactly `count` times.
  cloud_init_path = "${path.module}/../../cloud-init.yaml"
  # What an image holds (the software and the model): the builder's user data and the nodes'.
  image_edits = {
    model = {
      pattern = "/GGUF_APPLIANCE_MODEL=.*/"
      text    = "GGUF_APPLIANCE_MODEL=${local.model_source}"
      count   = 1
    }
    model_sha256 = {
      pattern = "/#GGUF_APPLIANCE_MODEL_SHA256=.*/"
      text    = "${local.model_sha256_line}"
      count   = 1
    }
    # The package to install and its pin in the constraints list.
    version = {
      pattern = "/gguf-appliance==[^\\s;]+/"
      text    = "gguf-appliance==${var.appliance_version}"
      count   = 2
    }
  }
  # What each node is on its own: set at its first boot, never baked.
  node_edits = {
    lb_subnet = {
      pattern = "/LB_SUBNET=.*/"
      text    = "LB_SUBNET=${var.lb_subnet_cidr}"
      count   = 1
    }
    # Where each node posts its load and which Vault secrets it reads (OCIDs, never a secret).
    oci = {
      pattern = "/# OCI settings: deploy/oci sets them here./"
      text    = "GGUF_APPLIANCE_OCI_METRICS_COMPARTMENT=${var.compartment_ocid}\n      GGUF_APPLIANCE_OCI_METRICS_NAMESPACE=${var.metrics_namespace}\n      GGUF_APPLIANCE_OCI_METRICS_POOL=${var.name}\n      GGUF_APPLIANCE_OCI_API_KEY_SECRETS=${local.api_key_secrets_line}\n      GGUF_APPLIANCE_OCI_HF_TOKEN_SECRET=${local.hf_token_secret}"
      count   = 1
    }
    # The API keys' digests: the node needs a key, and the user data holds no key itself.
    api_keys = {
      pattern = "/API_KEY_SHA256S=.*/"
      text    = "API_KEY_SHA256S=${local.api_key_sha256s_line}"
      count   = 1
    }
  }
  # The builder's bootstrap bakes: install, fetch, seal, power off (cloud-init.yaml).
  bake_edit = {
    pattern = "/GGUF_APPLIANCE_BAKE=no/"
    text    = "GGUF_APPLIANCE_BAKE=yes"
    count   = 1
  }
  image_user_data = replace(
    replace(
      replace(
        file(local.cloud_init_path),
        local.image_edits.model.pattern, local.image_edits.model.text
      ),
      local.image_edits.model_sha256.pattern, local.image_edits.model_sha256.text
    ),
    local.image_edits.version.pattern, local.image_edits.version.text
  )
  builder_user_data = replace(local.image_user_data, local.bake_edit.pattern, local.bake_edit.text)
  user_data = replace(
    replace(
      replace(
        local.image_user_data,
        local.node_edits.lb_subnet.pattern, local.node_edits.lb_subnet.text
      ),
      local.node_edits.oci.pattern, local.node_edits.oci.text
    ),
    local.node_edits.api_keys.pattern, local.node_edits.api_keys.text
  )

  # What the nodes boot: the baked image (image.tf), or the stock one.
  node_image_id = var.boot_from_baked_image ? one(oci_core_image.baked[*].id) : var.image_ocid
}

resource "oci_core_instance_configuration" "node" {
  compartment_id = var.compartment_ocid
  display_name   = "${var.name}-node"

  instance_details {
    instance_type = "compute"
    launch_details {
      compartment_id = var.compartment_ocid
      shape          = "VM.Standard.A2.Flex"
      shape_config {
        ocpus         = var.node_ocpus
        memory_in_gbs = var.node_memory_gbs
      }
      source_details {
        source_type             = "image"
        image_id                = local.node_image_id
        boot_volume_size_in_gbs = var.boot_volume_gbs
      }
      create_vnic_details {
        assign_public_ip = false
        nsg_ids          = [oci_core_network_security_group.nodes.id]
      }
      # Boot volume traffic between the host and the volume is encrypted too.
      is_pv_encryption_in_transit_enabled = true
      instance_options {
        # Only the authenticated v2 metadata endpoint: a request forged through the node cannot
        # read the user data.
        are_legacy_imds_endpoints_disabled = true
      }
      agent_config {
        # CPU metrics from the Oracle Cloud Agent feed the autoscaling below.
        is_monitoring_disabled = false
        is_management_disabled = false
      }
      metadata = {
        user_data = base64encode(local.user_data)
      }
      # The dynamic group (iam.tf) matches the pool's nodes on this tag.
      defined_tags = {
        "${oci_identity_tag_namespace.pool.name}.${oci_identity_tag.pool.name}" = var.name
      }
    }
  }

  # A new image, model or version is a new configuration; the pool moves to it before the old one
  # goes. Nodes already running keep what they booted with until they are replaced (docs/pool.md:
  # roll a new version).
  lifecycle {
    create_before_destroy = true
  }
}

resource "oci_core_instance_pool" "nodes" {
  compartment_id            = var.compartment_ocid
  display_name              = "${var.name}-pool"
  instance_configuration_id = oci_core_instance_configuration.node.id
  size                      = var.pool_min_nodes

  # Spread evenly over the three fault domains: one failing host rack takes a third at most.
  placement_configurations {
    availability_domain = local.availability_domain
    fault_domains       = ["FAULT-DOMAIN-1", "FAULT-DOMAIN-2", "FAULT-DOMAIN-3"]
    primary_vnic_subnets {
      subnet_id = oci_core_subnet.nodes.id
    }
  }

  # Every node joins the backend set when it is launched and leaves it when it is terminated.
  load_balancers {
    load_balancer_id = oci_load_balancer_load_balancer.pool.id
    backend_set_name = oci_load_balancer_backend_set.nodes.name
    port             = 80
    vnic_selection   = "PrimaryVnic"
  }

  # Autoscaling owns the size after creation.
  lifecycle {
    ignore_changes = [size]
  }
}

resource "oci_autoscaling_auto_scaling_configuration" "nodes" {
  compartment_id       = var.compartment_ocid
  display_name         = "${var.name}-autoscaling"
  cool_down_in_seconds = var.autoscaling_cooldown_seconds
  is_enabled           = true

  auto_scaling_resources {
    id   = oci_core_instance_pool.nodes.id
    type = "instancePool"
  }

  # On the load the nodes post (oci_metrics.py), not on CPU: a node is near 100% CPU as soon as
  # one stream decodes. Out: the pool's slots are mostly busy, or requests queue. In: only when
  # no node has had a stream in flight or a request queued for scale_in_idle_minutes, so the node
  # taken away cuts no stream short (it would drain anyway, for drain_timeout at most).
  policies {
    display_name = "load"
    policy_type  = "threshold"
    capacity {
      initial = var.pool_min_nodes
      min     = var.pool_min_nodes
      max     = var.pool_max_nodes
    }
    rules {
      display_name = "scale-out"
      action {
        type  = "CHANGE_COUNT_BY"
        value = 1
      }
      metric {
        metric_source         = "CUSTOM_QUERY"
        metric_compartment_id = var.compartment_ocid
        namespace             = var.metrics_namespace
        query                 = "busy_slot_ratio[1m]{pool = \"${var.name}\"}.grouping().mean() > ${var.scale_out_busy_ratio} || queue_depth[1m]{pool = \"${var.name}\"}.grouping().max() > 0"
        pending_duration      = "PT3M"
      }
    }
    rules {
      display_name = "scale-in"
      action {
        type  = "CHANGE_COUNT_BY"
        value = -1
      }
      metric {
        metric_source         = "CUSTOM_QUERY"
        metric_compartment_id = var.compartment_ocid
        namespace             = var.metrics_namespace
        query                 = "busy_slots[1m]{pool = \"${var.name}\"}.grouping().max() < 1 && queue_depth[1m]{pool = \"${var.name}\"}.grouping().max() < 1"
        pending_duration      = "PT${var.scale_in_idle_minutes}M"
      }
    }
  }
}
