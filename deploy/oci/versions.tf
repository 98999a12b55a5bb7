# The OCI provider reads credentials from ~/.oci/config (the profile below) or from the
# environment (OCI_CLI_AUTH, instance or resource principals); none belong in these files.
terraform {
  # 1.9: a variable's validation may refer to other variables.
  required_version = ">= 1.9"
  required_providers {
    oci = {
      source = "oracle/oci"
      # 6.16 made instance pools' load_balancers a set; 7.x is the current major version.
      version = ">= 6.16, < 8.0"
    }
    # The API key made when none is given (random_password keeps it out of plans and logs).
    random = {
      source  = "hashicorp/random"
      version = ">= 3.5, < 4.0"
    }
  }
}

provider "oci" {
  region              = var.region
  config_file_profile = var.oci_config_profile
}
