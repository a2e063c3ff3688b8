//! The one pipeline every source feeds: cluster state -> compile -> lower -> diff -> apply.
//! Local mode drives it from files; the Kubernetes agent will drive it from reflectors.

use std::collections::BTreeMap;

use crate::{
    datapath::{Changes, Datapath, DatapathError, EndpointId},
    policy::{
        compile::{CompileOptions, Compiled, Compiler},
        model::World,
    },
};

/// Compiler and datapath, and what was last compiled and enforced.
pub struct Pipeline {
    compiler: Compiler,
    compiled: Compiled,
    datapath: Datapath,
    /// cgroup id -> endpoint, as last enforced.
    cgroups: BTreeMap<u64, EndpointId>,
}

impl Pipeline {
    /// Compiles `world`; nothing is enforced until [`Self::enforce`].
    pub fn new(datapath: Datapath, world: World, options: CompileOptions) -> Self {
        let mut compiler = Compiler::new(world, options);
        let compiled = compiler.compile();
        Self {
            compiler,
            compiled,
            datapath,
            cgroups: BTreeMap::new(),
        }
    }

    /// Recompiles for a new cluster state (not yet enforced).
    pub fn set_world(&mut self, world: World) {
        self.compiler.set_world(world);
        self.compiled = self.compiler.compile();
    }

    /// Recompiles for a new cluster state and options; a change of options starts a new
    /// compiler (rule ids are then renumbered).
    pub fn set_world_with(&mut self, world: World, options: CompileOptions) {
        if self.compiler.options().baseline != options.baseline
            || self.compiler.options().node != options.node
        {
            self.compiler = Compiler::new(world, options);
            self.compiled = self.compiler.compile();
        } else {
            self.set_world(world);
        }
    }

    /// What the compiler last produced.
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// The cgroups enforced on, and as which endpoint.
    pub fn cgroups(&self) -> &BTreeMap<u64, EndpointId> {
        &self.cgroups
    }

    /// Writes the last compile to the kernel for `cgroups` (cgroup id -> endpoint). On error the
    /// kernel keeps enforcing what it did.
    pub fn enforce(
        &mut self,
        cgroups: BTreeMap<u64, EndpointId>,
    ) -> Result<Changes, DatapathError> {
        let changes = self.datapath.sync(&self.compiled.desired, &cgroups)?;
        self.cgroups = cgroups;
        Ok(changes)
    }
}
