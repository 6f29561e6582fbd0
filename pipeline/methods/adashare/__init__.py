"""AdaShare: per task, execute or skip each residual block (see ``method``)."""
from pipeline.methods.adashare.method import AdaShare, AdaShareFacts
from pipeline.methods.adashare.policy import (AdaShareConfig, PolicyBlock, free_blocks, policy_blocks, sharing_loss,
                                              sparsity_loss, temperature)

__all__ = ["AdaShare", "AdaShareFacts", "AdaShareConfig", "PolicyBlock", "free_blocks", "policy_blocks",
           "sharing_loss", "sparsity_loss", "temperature"]
