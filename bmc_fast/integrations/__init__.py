"""bmc_fast inside other libraries' training loops. Each integration is imported only when used:
``bmc_fast.integrations.avalanche`` needs the ``[avalanche]`` extra (avalanche-lib)."""
