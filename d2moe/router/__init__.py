"""The token-adaptive bit-width router (dual routing, method.md part 1): gate, capacities, loss,
training, storage beside the nested store. See docs/router.md. Imports torch only in submodules."""
