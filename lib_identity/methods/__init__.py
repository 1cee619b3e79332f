"""The methods: a validated unit -> what the UNet patch session installs (IP-Adapter today)."""
