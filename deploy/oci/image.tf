# The baked image (boot_from_baked_image): a builder instance boots the stock image with the
# nodes' cloud-init.yaml in bake mode (GGUF_APPLIANCE_BAKE=yes). It installs, compiles llama.cpp
# for this shape's CPU, fetches and verifies the model, forgets its instance (cloud-init's state,
# its machine-id, its key) and powers off. Terraform waits for it to stop, captures its boot volume
# as an image, and the instance configuration (nodes.tf) boots the pool's nodes from it: at first
# boot they only write their own settings and key and start the services.

# What goes into the image. A change (the version, the model, the base image) replaces the
# builder, which bakes a new image, which makes a new instance configuration for the pool.
resource "terraform_data" "image_inputs" {
  count = var.boot_from_baked_image ? 1 : 0
  input = {
    user_data  = sha256(local.builder_user_data)
    base_image = var.image_ocid
  }
}

resource "oci_core_instance" "builder" {
  count               = var.boot_from_baked_image ? 1 : 0
  compartment_id      = var.compartment_ocid
  availability_domain = local.availability_domain
  display_name        = "${var.name}-builder"
  # The nodes' shape: llama.cpp is compiled for the builder's CPU (GGML_NATIVE).
  shape = "VM.Standard.A2.Flex"
  shape_config {
    ocpus         = var.node_ocpus
    memory_in_gbs = var.node_memory_gbs
  }
  source_details {
    source_type             = "image"
    source_id               = var.image_ocid
    boot_volume_size_in_gbs = var.boot_volume_gbs
  }
  # The nodes' private subnet: out through the NAT gateway to the package registries and the
  # model's source, nothing in (the nodes' NSG lets only the balancer in, on port 80).
  create_vnic_details {
    subnet_id        = oci_core_subnet.nodes.id
    assign_public_ip = false
    nsg_ids          = [oci_core_network_security_group.nodes.id]
  }
  # Boot volume traffic between the host and the volume is encrypted too.
  launch_options {
    is_pv_encryption_in_transit_enabled = true
  }
  instance_options {
    are_legacy_imds_endpoints_disabled = true
  }
  agent_config {
    is_monitoring_disabled = false
    is_management_disabled = false
  }
  # No pool tag: the builder is not in the nodes' dynamic group, posts no metrics and reads no
  # secret; its user data names none (only the image's edits and the bake switch, nodes.tf).
  metadata = {
    user_data = base64encode(local.builder_user_data)
  }

  lifecycle {
    replace_triggered_by = [terraform_data.image_inputs[count.index]]
  }
}

# The bake ends with the builder powering itself off; the image is taken only then. The OCI CLI
# polls the builder's state (bounded by bake_timeout_minutes); a bake that fails leaves the
# builder running, and the apply fails here.
resource "terraform_data" "bake_finished" {
  count            = var.boot_from_baked_image ? 1 : 0
  triggers_replace = [oci_core_instance.builder[count.index].id]

  provisioner "local-exec" {
    command = "oci compute instance get --instance-id ${oci_core_instance.builder[count.index].id} --wait-for-state STOPPED --wait-interval-seconds 30 --max-wait-seconds ${var.bake_timeout_minutes * 60} --query 'data.\"lifecycle-state\"' --raw-output"
    environment = {
      OCI_CLI_PROFILE = var.oci_config_profile
    }
  }
}

resource "oci_core_image" "baked" {
  count          = var.boot_from_baked_image ? 1 : 0
  compartment_id = var.compartment_ocid
  instance_id    = oci_core_instance.builder[count.index].id
  display_name   = "${var.name}-${var.appliance_version}-${substr(sha256(local.builder_user_data), 0, 8)}"

  timeouts {
    create = "60m"
  }

  depends_on = [terraform_data.bake_finished]

  # A new image exists before the instance configuration that used the old one is replaced.
  lifecycle {
    create_before_destroy = true
  }
}
