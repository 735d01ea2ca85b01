"""The float model that FedAvg averages: its architecture config, the transforms and gains, the v4 GDN transforms
and hyperprior, the learned priors, the P-frame contexts they are indexed by, and ``FedlvcCodec`` with its upgrades.
Nothing here codes: entropy coding is ``common.coding``'s."""
