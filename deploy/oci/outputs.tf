output "load_balancer_ip" {
  description = "Public address of the load balancer: the chat page is http://THIS/ and the API http://THIS/v1."
  value       = one([for ip in oci_load_balancer_load_balancer.pool.ip_address_details : ip.ip_address if ip.is_public])
}

output "instance_pool_id" {
  description = "OCID of the instance pool (for `oci compute-management instance-pool list-instances`)."
  value       = oci_core_instance_pool.nodes.id
}
