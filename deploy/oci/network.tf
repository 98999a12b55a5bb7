# One VCN: a public subnet for the load balancer, a private one for the nodes. Every rule lives in
# the two network security groups; only the balancer's may take traffic from outside, and the
# nodes take port 80 from the balancer alone.

resource "oci_core_vcn" "pool" {
  compartment_id = var.compartment_ocid
  display_name   = var.name
  cidr_blocks    = [var.vcn_cidr]
  dns_label      = "ggufpool"
}

# OCI's stock default security list lets SSH in from anywhere; both subnets use it, emptied of
# all but path-MTU discovery (ICMP "fragmentation needed"), so the NSGs below say everything.
resource "oci_core_default_security_list" "pool" {
  manage_default_resource_id = oci_core_vcn.pool.default_security_list_id
  display_name               = "${var.name}-default"

  ingress_security_rules {
    protocol = "1"
    source   = "0.0.0.0/0"
    icmp_options {
      type = 3
      code = 4
    }
  }
}

resource "oci_core_internet_gateway" "pool" {
  compartment_id = var.compartment_ocid
  vcn_id         = oci_core_vcn.pool.id
  display_name   = "${var.name}-internet"
  enabled        = true
}

# The nodes reach Ubuntu's mirrors, PyPI and Hugging Face at boot, with no public address.
resource "oci_core_nat_gateway" "pool" {
  compartment_id = var.compartment_ocid
  vcn_id         = oci_core_vcn.pool.id
  display_name   = "${var.name}-nat"
}

resource "oci_core_route_table" "lb" {
  compartment_id = var.compartment_ocid
  vcn_id         = oci_core_vcn.pool.id
  display_name   = "${var.name}-lb"
  route_rules {
    destination       = "0.0.0.0/0"
    destination_type  = "CIDR_BLOCK"
    network_entity_id = oci_core_internet_gateway.pool.id
  }
}

resource "oci_core_route_table" "nodes" {
  compartment_id = var.compartment_ocid
  vcn_id         = oci_core_vcn.pool.id
  display_name   = "${var.name}-nodes"
  route_rules {
    destination       = "0.0.0.0/0"
    destination_type  = "CIDR_BLOCK"
    network_entity_id = oci_core_nat_gateway.pool.id
  }
}

resource "oci_core_subnet" "lb" {
  compartment_id             = var.compartment_ocid
  vcn_id                     = oci_core_vcn.pool.id
  display_name               = "${var.name}-lb"
  cidr_block                 = var.lb_subnet_cidr
  dns_label                  = "lb"
  route_table_id             = oci_core_route_table.lb.id
  security_list_ids          = [oci_core_vcn.pool.default_security_list_id]
  prohibit_public_ip_on_vnic = false
}

resource "oci_core_subnet" "nodes" {
  compartment_id             = var.compartment_ocid
  vcn_id                     = oci_core_vcn.pool.id
  display_name               = "${var.name}-nodes"
  cidr_block                 = var.nodes_subnet_cidr
  dns_label                  = "nodes"
  route_table_id             = oci_core_route_table.nodes.id
  security_list_ids          = [oci_core_vcn.pool.default_security_list_id]
  prohibit_public_ip_on_vnic = true
  prohibit_internet_ingress  = true
}

resource "oci_core_network_security_group" "lb" {
  compartment_id = var.compartment_ocid
  vcn_id         = oci_core_vcn.pool.id
  display_name   = "${var.name}-lb"
}

resource "oci_core_network_security_group" "nodes" {
  compartment_id = var.compartment_ocid
  vcn_id         = oci_core_vcn.pool.id
  display_name   = "${var.name}-nodes"
}

locals {
  listener_ports = var.certificate_ocid == null ? [80] : [80, 443]
  client_rules = {
    for pair in setproduct(var.client_cidrs, local.listener_ports) :
    "${pair[0]}:${pair[1]}" => { source = pair[0], port = pair[1] }
  }
}

# Clients reach the balancer's listeners.
resource "oci_core_network_security_group_security_rule" "lb_from_clients" {
  #checkov:skip=CKV_OCI_21:Stateful on purpose: replies to a client need no mirrored egress rule to every address on every ephemeral port, which a stateless rule would require.
  for_each                  = local.client_rules
  network_security_group_id = oci_core_network_security_group.lb.id
  description               = "clients to the balancer's listener on ${each.value.port}"
  direction                 = "INGRESS"
  protocol                  = "6"
  source                    = each.value.source
  source_type               = "CIDR_BLOCK"
  stateless                 = false
  tcp_options {
    destination_port_range {
      min = each.value.port
      max = each.value.port
    }
  }
}

# The balancer reaches the nodes' NGINX (requests and health checks), and nothing else.
resource "oci_core_network_security_group_security_rule" "lb_to_nodes" {
  network_security_group_id = oci_core_network_security_group.lb.id
  description               = "balancer to the nodes' NGINX"
  direction                 = "EGRESS"
  protocol                  = "6"
  destination               = oci_core_network_security_group.nodes.id
  destination_type          = "NETWORK_SECURITY_GROUP"
  stateless                 = false
  tcp_options {
    destination_port_range {
      min = 80
      max = 80
    }
  }
}

# The nodes take port 80 from the balancer only: no SSH, no direct clients.
resource "oci_core_network_security_group_security_rule" "nodes_from_lb" {
  #checkov:skip=CKV_OCI_21:Stateful on purpose: the source is the balancer's NSG alone, and a stateless rule would need a mirrored egress rule for the replies.
  network_security_group_id = oci_core_network_security_group.nodes.id
  description               = "balancer to the node's NGINX"
  direction                 = "INGRESS"
  protocol                  = "6"
  source                    = oci_core_network_security_group.lb.id
  source_type               = "NETWORK_SECURITY_GROUP"
  stateless                 = false
  tcp_options {
    destination_port_range {
      min = 80
      max = 80
    }
  }
}

# The nodes go out through the NAT gateway: Ubuntu's mirrors (HTTP), PyPI and Hugging Face
# (HTTPS). DNS and NTP go to the VCN's own 169.254.169.254, which needs no rule.
resource "oci_core_network_security_group_security_rule" "nodes_out" {
  for_each                  = toset(["80", "443"])
  network_security_group_id = oci_core_network_security_group.nodes.id
  description               = "nodes to the internet on ${each.value}, through the NAT gateway"
  direction                 = "EGRESS"
  protocol                  = "6"
  destination               = "0.0.0.0/0"
  destination_type          = "CIDR_BLOCK"
  stateless                 = false
  tcp_options {
    destination_port_range {
      min = tonumber(each.value)
      max = tonumber(each.value)
    }
  }
}
